"""Quantized linear layers on the GPU against bf16 ``F.linear``, layer by layer, on the Llama-3.1-8B shapes.

    python benchmarks/kernels_gpu.py [--m 1 2 4 8 16 32 64 128 256 1024 4096] [--formats w4g128 w8]

For each shape (qkv 4096->6144, o 4096->4096, gate/up 4096->28672, down 14336->4096, head 4096->128256),
each M and each format it times, replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``,
median): bf16 ``F.linear``, our prepared layer (``kernels.prepare(qw, "triton")``: the Triton weight-only op,
``kernels/triton_wonly.py``, or FP8 W8A8, ``kernels/fp8_w8a8.py``, at the kernel it dispatches to at that M) and the reference path (dequantize, then cuBLAS), all in this process on one card. It reports µs, the bytes the kernel must move (weights, x
and the output) over its time in GB/s and as a fraction of the copy bandwidth measured here, TFLOP/s,
and each time as a ratio to bf16 (> 1: faster). The last line is JSON (machine, card, commit, rows).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from quantdeploy.bench.decode import measure_bandwidth
from quantdeploy.eval.report import machine_info
from quantdeploy import kernels
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "head": (4096, 128256)}
FORMATS = {"w4g128": QuantSpec(dtype="int4", group_size=128), "w4g128-asym": QuantSpec(dtype="int4", group_size=128,
                                                                                      symmetric=False),
           "w8": QuantSpec(dtype="int8", group_size=None),
           "nf4g64": QuantSpec(dtype="nf4", group_size=64, double_quant=True),
           "fp8": QuantSpec(dtype="fp8_e4m3", group_size=None),
           "fp8-w8a8": QuantSpec(dtype="fp8_e4m3", group_size=None, activations="fp8_e4m3")}


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096])
    p.add_argument("--formats", nargs="+", default=["w4g128", "w8"], choices=sorted(FORMATS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reference", action="store_true", help="also time the reference path (slow)")
    args = p.parse_args()
    device = torch.device("cuda")
    bandwidth = measure_bandwidth(device)
    # replayed from a CUDA graph, as the engine's decode step runs them: the GPU's time, not Python's launches
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # noqa: E731 - µs
    rows = []
    print(f"copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    print(f"{'shape':8s} {'fmt':12s} {'M':>5s} {'bf16 us':>9s} {'ours us':>9s} {'ours GB/s':>9s} {'of copy':>8s} "
          f"{'TFLOP/s':>8s} {'vs bf16':>8s}" + (f" {'ref us':>9s}" if args.reference else ""), flush=True)
    for shape in args.shapes:
        k, n = SHAPES[shape]
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device) * 0.02
        w16 = w.to(torch.bfloat16)
        for fmt in args.formats:
            qw = quantize_weight(w, FORMATS[fmt])
            prepared = kernels.prepare(qw, "triton")  # the layer as the engine runs it
            wbytes = sum(v.numel() * v.element_size() for v in qw.tensors.values())
            for m in args.m:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                base = bench(lambda: F.linear(x, w16))
                ours = bench(lambda: prepared(x, None))
                ref = bench(lambda: reference.qlinear(x, qw, None)) if args.reference else None
                moved = wbytes + 2 * m * (k + n)
                row = {"shape": shape, "k": k, "n": n, "format": fmt, "m": m, "bf16_us": base, "ours_us": ours,
                       "ref_us": ref, "ours_gbs": moved / ours / 1e3, "of_copy": moved / ours / 1e3 / bandwidth,
                       "ours_tflops": 2 * m * k * n / ours / 1e6, "vs_bf16": base / ours}
                rows.append(row)
                print(f"{shape:8s} {fmt:12s} {m:5d} {base:9.1f} {ours:9.1f} {row['ours_gbs']:9.0f} "
                      f"{100 * row['of_copy']:7.1f}% {row['ours_tflops']:8.1f} {row['vs_bf16']:7.2f}x"
                      + (f" {ref:9.1f}" if ref is not None else ""), flush=True)
            del qw, prepared
        del w, w16
        torch.cuda.empty_cache()
    print(json.dumps({**machine_info(), "benchmark": "kernels_gpu", "bandwidth_gbs": bandwidth,
                      "config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
