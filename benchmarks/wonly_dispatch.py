"""Which weight-only path wins at which M: the crossover table behind ``kernels/triton_wonly.py:ROUTES``.

    python benchmarks/wonly_dispatch.py [--m 1 2 4 8 16 32 64 128 256 512 1024 2048 4096]
        [--formats w4g128 w8] [--shapes qkv o gate_up down] [--sweep]

For each Llama-3.1-8B decoder shape, format and M it times, replayed from CUDA graphs (median): bf16
``F.linear``; the row kernel (``triton_gemv.py``, up to 16 rows), the tile kernel (``triton_gemm.py``) and
dequantize + cuBLAS, each at the configuration the code picks; with ``--sweep`` also the row and tile
kernels over a grid of tile shapes (the best three printed, with the configuration). Then, per format
and M, the per-layer time of each path (qkv + o + gate/up + down, as a decoder layer runs them) and its
ratio to bf16's: the path with the least time is the crossover table's entry, and its worst single-shape
ratio is shown too. ``ROUTES`` and the ``*_config`` rules are read from this output by hand.
The last line is JSON (machine, card, commit, rows).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from quantdeploy.bench.decode import measure_bandwidth
from quantdeploy.eval.report import machine_info
from quantdeploy.kernels.triton_gemm import gemm_config, gemm_impl
from quantdeploy.kernels.triton_gemv import gemv_config, gemv_impl
from quantdeploy.kernels.triton_split import counters
from quantdeploy.kernels.triton_wonly import ROUTES, TritonWeightOnly, route, run, wonly_mm
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
FORMATS = {"w4g128": QuantSpec(dtype="int4", group_size=128),
           "w4g128-asym": QuantSpec(dtype="int4", group_size=128, symmetric=False),
           "w8": QuantSpec(dtype="int8", group_size=None),
           "nf4g64": QuantSpec(dtype="nf4", group_size=64, double_quant=True)}
ROW_LIMIT = 16  # the row kernel is timed up to this many rows


def row_grid(m: int, bits: int, chunk: int, sms: int) -> list[tuple]:
    """Row-kernel configs: channels, words per tile, warps, and the grid K is split up to (programs per SM)."""
    rows = min(triton_next_pow2(m), 8)
    return [(rows, bn, chunk, w // chunk, warps, per_sm * sms)
            for bn, w, warps, per_sm in itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4), (4, 8, 16))]


def tile_grid(m: int) -> list[tuple]:
    """Tile-kernel configs: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM)``."""
    if m <= 64:
        shapes = [(min(max(m, 16), 64), bn, bk) for bn in (32, 64, 128) for bk in (64, 128)]
    elif m <= 512:
        shapes = [(bm, bn, 64) for bm in (64, 128) for bn in (64, 128, 256)]
    else:
        shapes = [(128, bn, bk) for bn in (128, 256) for bk in (32, 64)] + [(64, 256, 64), (256, 128, 64)]
    return [(bm, bn, bk, warps, stages, per_sm) for (bm, bn, bk), warps, stages, per_sm in
            itertools.product(shapes, (4, 8), (3, 4), (2, 4)) if not (bm * bn >= 128 * 256 and warps == 4)]


def triton_next_pow2(m: int) -> int:
    return 1 << (max(m, 1) - 1).bit_length()


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--formats", nargs="+", default=["w4g128", "w8"], choices=sorted(FORMATS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also sweep the row and tile kernels' tile shapes")
    p.add_argument("--rep", type=int, default=30, help="milliseconds of replays per timing")
    args = p.parse_args()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bandwidth = measure_bandwidth(device)

    def bench(fn):  # noqa: ANN001, ANN202 - µs, or None where the configuration does not run (resources)
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001 - an out-of-resources tile shape is a sweep result, not an error
            print(f"    (skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
            return None

    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy bandwidth {bandwidth:.0f} GB/s; µs replayed from CUDA "
          f"graphs (median); routes in the code: {ROUTES}", flush=True)
    rows = []
    for fmt, shape in itertools.product(args.formats, args.shapes):
        k, n = SHAPES[shape]
        spec = FORMATS[fmt]
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device) * 0.02
        w16 = w.to(torch.bfloat16)
        qw = quantize_weight(w, spec)
        prepared = TritonWeightOnly(qw)  # NF4: scales decoded once, the levels' table (lut)
        q, s, z, lut = qw.tensors["qweight"], prepared.scales, prepared.zeros, prepared.lut
        bits, group, kind = spec.bits, spec.group_for(k), "nf4" if lut is not None else spec.bits
        wbytes = sum(t.numel() * t.element_size() for t in (q, s, z) if t is not None)  # what the kernels read
        locks = counters(w.device, 4 * sms)  # split-K counters, enough for the sweep's grids of up to 16 per SM
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            row = {"format": fmt, "shape": shape, "m": m, "bf16_us": bench(lambda: F.linear(x, w16)),
                   "dispatched": route(kind, m)}
            row["dispatched_us"] = bench(lambda: wonly_mm(x, q, s, z, bits, group, locks, lut))
            for path in ("row", "tile", "dequant"):
                if path != "row" or m <= ROW_LIMIT:
                    row[f"{path}_us"] = bench(lambda: run(path, x, q, s, z, bits, group, locks, lut))
            found = {}
            if args.sweep and m <= ROW_LIMIT:
                chunk = gemv_config(m, n, k, bits, group, sms)[2]
                found["row"] = [(bench(lambda: gemv_impl(x, q, s, z, bits, group, sms, c, locks, lut)), c)
                                for c in row_grid(m, bits, chunk, sms)]
            if args.sweep and m >= 8:
                found["tile"] = [(bench(lambda: gemm_impl(x, q, s, z, bits, group, sms, c, locks, lut)), c)
                                 for c in tile_grid(m)]
            base = row["bf16_us"]
            moved = wbytes + 2 * m * (k + n)
            cells = " ".join(f"{path} {row[f'{path}_us']:7.1f} ({base / row[f'{path}_us']:.2f}x)"
                             for path in ("row", "tile", "dequant") if row.get(f"{path}_us"))
            print(f"{fmt:11s} {shape:8s} M={m:5d}: bf16 {base:7.1f} | {cells} | dispatched {row['dispatched']} "
                  f"{row['dispatched_us']:7.1f} ({base / row['dispatched_us']:.2f}x, "
                  f"{moved / row['dispatched_us'] / 1e3 / bandwidth:.0%} of copy)", flush=True)
            for path, results in found.items():
                results = sorted((t, c) for t, c in results if t is not None)
                row[f"{path}_best"] = results[:3]
                row[f"{path}_all"] = results
                chosen = (gemv_config(m, n, k, bits, group, sms, lut is not None) if path == "row"
                          else gemm_config(m, n, k, bits, group, sms))
                print(f"    {path} sweep best: " + "; ".join(f"{t:.1f} us ({base / t:.2f}x) {c}" for t, c in results[:3])
                      + f"  [code picks {chosen}]", flush=True)
            rows.append(row)
        torch.cuda.empty_cache()  # the next shape's weights replace these (rebound at the loop's top)
    print("\nper decoder layer (qkv + o + gate/up + down), µs and ratio to bf16; 'best' = least time", flush=True)
    if args.sweep:  # the code takes one configuration per M bucket for every shape: the best layer total
        for fmt, m, path in itertools.product(args.formats, args.m, ("row", "tile")):
            cell = [r for r in rows if r["format"] == fmt and r["m"] == m and f"{path}_all" in r]
            totals = {}
            for r in cell:
                for t, c in r[f"{path}_all"]:
                    totals.setdefault(c, []).append(t)
            whole = sorted((sum(ts), c) for c, ts in totals.items() if len(ts) == len(SHAPES) == len(cell))
            if whole:
                base = sum(r["bf16_us"] for r in cell)
                print(f"{fmt:11s} M={m:5d} {path} one configuration for the layer: " + "; ".join(
                    f"{t:.1f} us ({base / t:.2f}x) {c}" for t, c in whole[:3]), flush=True)
    for fmt, m in itertools.product(args.formats, args.m):
        cell = [r for r in rows if r["format"] == fmt and r["m"] == m]
        if {r["shape"] for r in cell} != set(SHAPES):
            continue
        base = sum(r["bf16_us"] for r in cell)
        totals = {path: sum(r[f"{path}_us"] for r in cell) for path in ("row", "tile", "dequant", "dispatched")
                  if all(r.get(f"{path}_us") for r in cell)}
        best = min((t, path) for path, t in totals.items() if path != "dispatched")[1]
        worst = min(r["bf16_us"] / r[f"{best}_us"] for r in cell)
        print(f"{fmt:11s} M={m:5d} bf16 {base:8.1f} | " + " | ".join(f"{path} {t:8.1f} ({base / t:.2f}x)"
              for path, t in totals.items()) + f" | best {best} (worst shape {worst:.2f}x)", flush=True)
    print(json.dumps({**machine_info(), "benchmark": "wonly_dispatch", "bandwidth_gbs": bandwidth, "sms": sms,
                      "routes": {str(b): r for b, r in ROUTES.items()}, "config": vars(args),
                      "rows": [{key: v for key, v in r.items() if not key.endswith("_all")} for r in rows]}))


if __name__ == "__main__":
    main()
