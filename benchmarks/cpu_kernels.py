"""PyTorch's packed CPU kernels against the reference path (dequantize, then matmul), on the bundled
SmolLM2's layer shapes, and the whole engine's decode with each backend.

    python benchmarks/cpu_kernels.py [--threads 2]

Per shape: µs per call at 1 and 8 rows of activations for the reference path, the packed kernel and
an fp32 matmul on the unquantized weight, with the packed result's relative error to the reference.
Then decode tok/s of the int8 and int4 bundled model through ``Engine`` with backend="reference" and
"auto" (packed). Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantdeploy import kernels
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "output": (49152, 576)}
SPECS = {"int8": QuantSpec("int8", None), "int4-g32": QuantSpec("int4", 32)}


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
            packed = kernels.prepare(qw)
            for m in (1, 8):
                x = torch.randn(m, k, generator=g)
                reps = 20 if n > 10000 else 200
                ref = reference.qlinear(x, qw, None)
                err = float((packed(x, None) - ref).norm() / ref.norm())
                dense = dequantize_weight(qw)
                rows.append({"spec": spec_name, "layer": name, "m": m,
                             "reference_us": _time(lambda: reference.qlinear(x, qw, None), reps),
                             "packed_us": _time(lambda: packed(x, None), reps),
                             "fp32_matmul_us": _time(lambda: x @ dense.T, reps), "rel_err": err})
    return rows


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
        for backend in ("reference", "auto"):
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kt = kernel_table()
    print(f"{'spec':9s} {'layer':7s} {'m':>2s} {'reference us':>13s} {'packed us':>10s} {'fp32 mm us':>11s} "
          f"{'speedup':>8s} {'rel err':>8s}")
    for r in kt:
        print(f"{r['spec']:9s} {r['layer']:7s} {r['m']:2d} {r['reference_us']:13.1f} {r['packed_us']:10.1f} "
              f"{r['fp32_matmul_us']:11.1f} {r['reference_us'] / r['packed_us']:7.1f}x {r['rel_err']:8.1e}")
    et = engine_table(args.batches)
    print(f"\n{'model':9s} {'backend':10s} {'batch':>5s} {'decode tok/s':>13s}")
    for r in et:
        print(f"{r['model']:9s} {r['backend']:10s} {r['batch']:5d} {r['tok_s']:13.1f}")
    print(json.dumps({**machine_info(), "config": vars(args), "kernels": kt, "engine": et}))


if __name__ == "__main__":
    main()
