"""Every weight format against the unquantized model on the CPU: decode tok/s of the bundled SmolLM2 through
``Engine`` at 1, 4, 8 and 16 rows, the engine eager (the CPU default), formats measured alternately with
the original in rounds, median of the rounds.

    python benchmarks/formats_cpu.py [--formats int8 int4-g32 nf4 fp8 fp8-w8a8 w8a8] [--rounds 3]

Why: quantization must never make a workload slower, and on a CPU most formats have no kernel of their
own (``kernels/__init__.py`` says which path each takes: our int4/int8 kernels or PyTorch's packed ones,
int8 W8A8 integer products, or the weight dequantized once and multiplied densely). A ratio under 1.0 is a format that
costs the user time. Each format is quantized with round to nearest (SmoothQuant for ``w8a8``,
calibrated on the packaged demo text: the values change, not the speed); the output head stays as the
original's. Prints a table of tok/s and ratios to the original, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

FORMATS = ("int8", "int4-g32", "nf4", "fp8", "fp8-w8a8", "w8a8")


def configs() -> dict:
    import quantdeploy as qd
    from quantdeploy.demo import default_text_path

    calib = qd.CalibrationConfig(source=str(default_text_path()), num_samples=4, seq_len=128)  # speed only
    return {"int8": qd.RTNConfig(bits=8, group_size=None), "int4-g32": qd.RTNConfig(bits=4, group_size=32),
            "nf4": qd.NF4Config(group_size=64), "fp8": qd.FP8Config(), "fp8-w8a8": qd.FP8Config(activations=True),
            "w8a8": qd.SmoothQuantConfig(calibration=calib)}


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.bench.decode import BenchConfig, decode_rate
    from quantdeploy.engine.engine import Engine
    from quantdeploy.eval.report import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = qd.load_model("bundled")
    cfg = BenchConfig(prompt_len=32, batches=tuple(args.batches), steps=args.steps, warmup=2)
    every = configs()
    engines = {"original": Engine.from_bundle(base, "cpu", max_batch=max(args.batches), max_seq_len=cfg.seq_len())}
    for name in args.formats:
        engines[name] = Engine.from_bundle(qd.quantize(base, every[name]), "cpu", max_batch=max(args.batches),
                                           max_seq_len=cfg.seq_len())
    runs: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in engines}
    for r in range(args.rounds):  # alternate: every engine once per round, batch by batch
        for b in args.batches:
            for name, engine in engines.items():
                runs[name][b].append(decode_rate(engine, b, cfg)[0])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in runs.items()}
    print(f"\nbundled SmolLM2-135M, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, eager; "
          f"decode tok/s (median of {args.rounds} alternating rounds) and ratio to the original")
    print(f"{'format':10s} " + " ".join(f"{f'b{b}':>14s}" for b in args.batches))
    for name in engines:
        cells = [f"{med[name][b]:7.1f} {med[name][b] / med['original'][b]:5.2f}x" for b in args.batches]
        print(f"{name:10s} " + " ".join(f"{c:>14s}" for c in cells))
    info = machine_info()
    info.update({"benchmark": "formats_cpu", "config": vars(args), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "tok_s": runs, "median": med,
                 "vs_original": {n: {b: med[n][b] / med["original"][b] for b in args.batches} for n in engines}})
    print(json.dumps(info))


if __name__ == "__main__":
    main()
