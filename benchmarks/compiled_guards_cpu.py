"""What Dynamo's guards cost the compiled decode step on the CPU: the engine as it is (no guards on the
model's modules, ``engine/decode_graphs.compile_decode``) against the same engine keeping every guard,
alternating in one process on the bundled SmolLM2 (int4 g32 and int8 per channel, head included).

    python benchmarks/compiled_guards_cpu.py [--threads 2] [--batches 1 8] [--rounds 4]

Each round times 24 decode steps of each engine in turn; the median of the rounds after the first is kept.
Prints a table, then one JSON line (machine, commit, config).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def step_seconds(engine, batch: int, steps: int = 24) -> float:
    from quantdeploy.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        engine.add(list(range(100 + i, 228 + i)), params)
    for _ in range(6):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    while engine.running:
        engine.step()
    return elapsed


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.engine.engine import Engine
    from quantdeploy.eval.report import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = qd.load_model("bundled")
    head = qd.TargetConfig(lm_head=True)
    formats = {"int4": qd.RTNConfig(bits=4, group_size=32, pin_group_size=True, targets=head),
               "int8": qd.RTNConfig(bits=8, group_size=None, targets=head)}
    variants = {"every guard": {"guard_filter_fn": lambda entries: [True] * len(entries)}, "engine": {}}
    rows = []
    for fmt, config in formats.items():
        model = qd.quantize(base, config)
        for batch in args.batches:
            engines = {name: Engine.from_bundle(model, "cpu", max_batch=batch, max_seq_len=256, compile=True,
                                                compile_options=options) for name, options in variants.items()}
            times: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    times[name].append(step_seconds(engine, batch))
            ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
            rows.append({"format": fmt, "batch": batch, "ms_per_step": ms, "speedup": ms["every guard"] / ms["engine"]})
            print(f"{fmt} batch {batch}: every guard {ms['every guard']:.2f} ms | engine {ms['engine']:.2f} ms "
                  f"({ms['every guard'] / ms['engine']:.2f}x)", flush=True)
    print(json.dumps({**machine_info(), "config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
