"""The int4 row kernel's tile shape, swept on the GPU: what ``gemv4_config`` chooses is read from here.

    python benchmarks/gemv4_layouts.py [--shapes gate_up down o qkv] [--m 1 2 4 8] [--check]

For each Llama-3.1-8B shape, int4 g128 symmetric and asymmetric, and each M, it times, replayed from CUDA
graphs (median): bf16 ``F.linear``; the tensor-core tile kernel (``wonly_mm_impl``); the row kernel
(``gemv4_impl``) at the configuration ``gemv4_config`` picks; and the row kernel over a sweep of channels
per program, words per tile and warps.
It prints the chosen configuration's time and the best three of the sweep, with their ratio to bf16 and
the achieved GB/s as a fraction of the copy bandwidth measured in the same process. With ``--check`` it
only compares the row kernel with the reference on small shapes (any device; ``TRITON_INTERPRET=1`` on a
CPU). The last line is JSON (machine, card, commit, rows).

History: the first row kernel held many channels and a short stretch of K, so x was converted per code
and went through shared memory in the loop (its PTX: 128 barriers, 267 conversions per iteration; 64.8 µs
on gate/up against bf16's 55.8 on an H200, ``results/gemv4-layouts-h200.txt``). The long-K tile that
replaced it holds few channels and converts x once per tile. Its sweep against that experiment's kernel
(kept in this script as a control at 4e3275e) is ``results/gemv4-row-kernel-h200.txt``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from quantdeploy.eval.report import machine_info
from quantdeploy.kernels import reference
from quantdeploy.kernels.triton_wonly import gemv4_config, gemv4_impl, wonly_mm_impl
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def check() -> None:
    """The row kernel against the fp32 reference on small shapes, at its own and at forced configurations."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for n, k, group, symmetric, m in ((40, 256, 32, True, 1), (24, 640, 128, False, 3), (20, 200, None, False, 2),
                                      (16, 4104, 8, True, 1), (18, 384, 96, False, 1)):
        torch.manual_seed(0)
        qw = quantize_weight(torch.randn(n, k, device=device) * 0.05,
                             QuantSpec(dtype="int4", group_size=group, symmetric=symmetric))
        t, g = qw.tensors, qw.spec.group_for(k)
        x = torch.randn(m, k, device=device)
        expected = reference.qlinear(x, qw, None)
        chunk = gemv4_config(n, k, g, 8)[1]
        for config in (None, (4, chunk, 2, 1, 64), (8, chunk, 1, 1, 4)):
            y = gemv4_impl(x, t["qweight"], t["scales"], t.get("zeros"), g, config)
            err = ((y - expected).norm() / expected.norm()).item()
            print(f"n={n} k={k} group={g} symmetric={symmetric} m={m} config={config}: relative error {err:.1e}")
            assert err < 1e-5, err


def main() -> None:
    from quantdeploy.bench.decode import measure_bandwidth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--check", action="store_true", help="only compare the row kernel with the reference")
    p.add_argument("--no-sweep", action="store_true", help="only the configuration gemv4_config picks")
    args = p.parse_args()
    if args.check:
        return check()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bandwidth = measure_bandwidth(device)
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # noqa: E731 - µs
    rows = []
    print(f"int4 g128, on {torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.0f} GB/s; µs replayed from "
          "CUDA graphs (median)", flush=True)
    for shape, symmetric, m in itertools.product(args.shapes, (True, False), args.m):
        k, n = SHAPES[shape]
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device) * 0.02
        qw = quantize_weight(w, QuantSpec(dtype="int4", group_size=128, symmetric=symmetric))
        q, s, z = qw.tensors["qweight"], qw.tensors["scales"], qw.tensors.get("zeros")
        moved = sum(v.numel() * v.element_size() for v in qw.tensors.values()) + 2 * m * (k + n)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        base = bench(lambda: torch.nn.functional.linear(x, w16))
        tile = bench(lambda: wonly_mm_impl(x, q, s, z, 4, 128))
        chosen = gemv4_config(n, k, 128, sms)
        ours = bench(lambda: gemv4_impl(x, q, s, z, 128))
        print(f"{shape:8s} sym={symmetric!s:5s} M={m}: bf16 {base:6.1f} | tile kernel {tile:6.1f} ({base / tile:.2f}x) "
              f"| row kernel {ours:6.1f} ({base / ours:.2f}x, {moved / ours / 1e3 / bandwidth:.0%} of copy) "
              f"at {chosen}", flush=True)
        found = [(ours, chosen)]
        blocks = (8, 16, 32) if m == 1 else (4, 8, 16)
        words_options = (32, 64, 128) if m == 1 else (32, 64)
        warps_options = (2, 4, 8) if m == 1 else (4,)
        for block_n, words, warps in itertools.product(blocks, words_options, warps_options) if not args.no_sweep else ():
            config = (block_n, chosen[1], words // chosen[1], warps, chosen[4])
            found.append((bench(lambda: gemv4_impl(x, q, s, z, 128, config)), config))
        found.sort()
        for us, config in found[:3]:
            print(f"    {us:6.1f} us ({base / us:.2f}x bf16, {moved / us / 1e3 / bandwidth:.0%} of copy)  "
                  f"(channels/program, chunk, chunks, warps, programs aimed at) = {config}", flush=True)
        rows.append({"shape": shape, "symmetric": symmetric, "m": m, "bf16_us": base, "tile_us": tile,
                     "row_us": ours, "row_config": chosen, "best_us": found[0][0], "best_config": found[0][1],
                     "of_copy_best": moved / found[0][0] / 1e3 / bandwidth})
    print(json.dumps({**machine_info(), "benchmark": "gemv4_layouts", "bandwidth_gbs": bandwidth,
                      "config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
