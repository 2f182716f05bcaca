"""Our CPU kernels (``cpu_native``) and PyTorch's packed ones (``cpu_packed``) against the reference path
(dequantize, then matmul), on the bundled SmolLM2's layer shapes, and the whole engine's decode with each.

    python benchmarks/cpu_kernels.py [--threads 2]
    python benchmarks/cpu_kernels.py --sweep [--backend cpu_native] [--threads 2]

--sweep: per spec, layer shape and number of rows M, µs of the backend's kernel, of its dense route
(dequantize, then ``F.linear``) and of ``F.linear`` on the unquantized fp32 weight, measured in turn;
then per spec the smallest M from which the dense route is at least as fast as the kernel on every
shape (what the backend's ``DENSE_FROM_ROWS`` should say on this machine) and the slowest quantized/fp32
ratio with the routes as the code has them.

Per shape: µs per call at 1 and 8 rows of activations for the reference path, each backend's kernel and
an fp32 matmul on the unquantized weight, with each result's relative error to the reference.
Then decode tok/s of the int8 and int4 bundled model through ``Engine`` with each backend. Prints tables,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantdeploy import kernels
from quantdeploy.kernels import cpu_native, cpu_packed
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "output": (49152, 576)}
SPECS = {"int8": QuantSpec("int8", None), "int4-g32": QuantSpec("int4", 32)}
BACKENDS = {"cpu_native": cpu_native, "cpu_packed": cpu_packed}


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def kernel_table() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for spec_name, spec in SPECS.items():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, generator=g)
            qw = quantize_weight(w, spec)
            prepared = {b: kernels.prepare(qw, b) for b in BACKENDS}
            for m in (1, 8):
                x = torch.randn(m, k, generator=g)
                reps = 20 if n > 10000 else 200
                ref = reference.qlinear(x, qw, None)
                dense = dequantize_weight(qw)
                row = {"spec": spec_name, "layer": name, "m": m,
                       "reference_us": _time(lambda: reference.qlinear(x, qw, None), reps),
                       "fp32_matmul_us": _time(lambda: x @ dense.T, reps)}
                for b, kernel in prepared.items():
                    row[f"{b}_us"] = _time(lambda: kernel(x, None), reps)
                    row[f"{b}_rel_err"] = float((kernel(x, None) - ref).norm() / ref.norm())
                rows.append(row)
    return rows


SWEEP_ROWS = (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)


def sweep_table(backend: str) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for spec_name, spec in SPECS.items():
        for name, (n, k) in SHAPES.items():
            if name == "output":
                continue  # the head runs on the last position of each row only: decode batches, never prefill
            w = torch.randn(n, k, generator=g) * 0.02
            packed = kernels.prepare(quantize_weight(w, spec), backend)
            for m in SWEEP_ROWS:
                x = torch.randn(m, k, generator=g)
                reps = max(5, 400 // m)
                rows.append({"spec": spec_name, "layer": name, "m": m,
                             "kernel_us": _time(lambda: packed.kernel(x), reps),
                             "dense_us": _time(lambda: packed.dense(x), reps),
                             "fp32_us": _time(lambda: x @ w.T, reps), "routed_us": _time(lambda: packed(x, None), reps)})
    return rows


def sweep_summary(rows: list[dict], backend: str) -> dict:
    out = {}
    for spec_name in SPECS:
        mine = [r for r in rows if r["spec"] == spec_name]
        slower = {m for r in mine for m in [r["m"]] if r["dense_us"] > r["kernel_us"]}
        crossover = next((m for m in SWEEP_ROWS if all(x < m for x in slower)), None)
        worst = max(mine, key=lambda r: r["routed_us"] / r["fp32_us"])
        out[spec_name] = {"dense_from_measured": crossover, "dense_from_in_code": BACKENDS[backend].DENSE_FROM_ROWS[spec_name[:4]],
                          "worst_vs_fp32": {"ratio": worst["routed_us"] / worst["fp32_us"], "layer": worst["layer"],
                                            "m": worst["m"]}}
    return out


def engine_table(batches: list[int]) -> list[dict]:
    import tempfile
    from pathlib import Path

    import quantdeploy as qd
    from quantdeploy.bench.decode import BenchConfig, decode_rate

    base = qd.load_model("bundled")
    work = Path(tempfile.mkdtemp(prefix="qd-kernels-"))
    rows = []
    for name, cfg in (("int8", qd.RTNConfig(bits=8, group_size=None, targets=qd.TargetConfig(lm_head=True))),
                      ("int4-g32", qd.RTNConfig(bits=4, group_size=32, targets=qd.TargetConfig(lm_head=True)))):
        qd.save(qd.quantize(base, cfg), work / name)
        for backend in ("reference", *BACKENDS):
            engine = qd.Engine.load(work / name, "cpu", backend=backend, max_batch=max(batches), max_seq_len=96)
            bench = BenchConfig(prompt_len=48, batches=tuple(batches), steps=8, warmup=2)
            for b in batches:
                rows.append({"model": name, "backend": backend, "batch": b, "tok_s": decode_rate(engine, b, bench)[0]})
    return rows


def main() -> None:
    from quantdeploy.eval.report import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sweep", action="store_true", help="the dense-route crossover sweep only")
    p.add_argument("--backend", choices=list(BACKENDS), default="cpu_native", help="the sweep's kernels")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        st = sweep_table(args.backend)
        print(f"{'spec':9s} {'layer':6s} {'m':>4s} {'kernel us':>10s} {'dense us':>9s} {'fp32 us':>8s} {'routed/fp32':>12s}")
        for r in st:
            print(f"{r['spec']:9s} {r['layer']:6s} {r['m']:4d} {r['kernel_us']:10.1f} {r['dense_us']:9.1f} "
                  f"{r['fp32_us']:8.1f} {r['routed_us'] / r['fp32_us']:11.2f}x")
        summary = sweep_summary(st, args.backend)
        for spec_name, v in summary.items():
            print(f"{spec_name}: dense route at least as fast as the kernel from {v['dense_from_measured']} rows on every "
                  f"shape (code: {v['dense_from_in_code']}); slowest routed/fp32 {v['worst_vs_fp32']['ratio']:.2f}x "
                  f"({v['worst_vs_fp32']['layer']}, {v['worst_vs_fp32']['m']} rows)")
        print(json.dumps({**machine_info(), "capability": torch.backends.cpu.get_cpu_capability(),
                          "config": vars(args), "sweep": st, "summary": summary}))
        return
    kt = kernel_table()
    print(f"{'spec':9s} {'layer':7s} {'m':>2s} {'reference us':>13s} {'fp32 mm us':>11s} {'native us':>10s} "
          f"{'packed us':>10s} {'native/fp32':>12s} {'packed/fp32':>12s} {'native err':>11s} {'packed err':>11s}")
    for r in kt:
        print(f"{r['spec']:9s} {r['layer']:7s} {r['m']:2d} {r['reference_us']:13.1f} {r['fp32_matmul_us']:11.1f} "
              f"{r['cpu_native_us']:10.1f} {r['cpu_packed_us']:10.1f} {r['cpu_native_us'] / r['fp32_matmul_us']:11.2f}x "
              f"{r['cpu_packed_us'] / r['fp32_matmul_us']:11.2f}x {r['cpu_native_rel_err']:11.1e} {r['cpu_packed_rel_err']:11.1e}")
    et = engine_table(args.batches)
    print(f"\n{'model':9s} {'backend':10s} {'batch':>5s} {'decode tok/s':>13s}")
    for r in et:
        print(f"{r['model']:9s} {r['backend']:10s} {r['batch']:5d} {r['tok_s']:13.1f}")
    print(json.dumps({**machine_info(), "config": vars(args), "kernels": kt, "engine": et}))


if __name__ == "__main__":
    main()
