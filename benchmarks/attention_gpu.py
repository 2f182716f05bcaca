"""Split-KV decode attention over the paged cache, alone, on the Llama-3.1-8B attention shape (32 query
heads, 8 KV heads, head size 128, bf16): how many splits of each row's positions keep the card busy.

    python benchmarks/attention_gpu.py [--splits 1 2 4 ... 128]

For each case (rows x the positions each row holds, and the cache length it was allocated for, which is
what ``splits_for`` sees) it times ``decode_attention_impl`` replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``, median) at every split count, and the split count the engine
picks by default; the bytes are the keys and values the rows hold (plus q and the output), reported in
GB/s and as a fraction of the copy bandwidth measured in the same run. One layer's attention: the engine
runs it 32 times per step, so at 8k positions and batch 1 every 10 µs here is 0.3 ms per token.
The last line is JSON (machine, card, commit, rows).
"""

from __future__ import annotations

import argparse
import json

import torch

from quantdeploy.bench.decode import measure_bandwidth
from quantdeploy.engine.kv_cache import BLOCK_TOKENS, blocks_for
from quantdeploy.eval.report import machine_info
from quantdeploy.kernels.triton_attention import MAX_SPLITS, decode_attention_impl, splits_for
from quantdeploy.kernels.triton_split import sm_count

HEADS, KV_HEADS, DIM = 32, 8, 128
CASES = [(1, 8192, 8192), (1, 32768, 32768), (16, 8192, 8192), (16, 32768, 32768), (64, 160, 256),
         (64, 160, 8192), (64, 160, 32768), (4, 2048, 2048), (64, 2048, 2048)]  # rows, positions held, cache length


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--launch", nargs="+", default=["4x2"],
                   help="warps x stages of the split kernel to try (the engine runs 4x2)")
    p.add_argument("--cases", nargs="+", help="ROWSxHELDxCACHE to run instead of the default cases (e.g. 1x32768x32768)")
    args = p.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases] if args.cases else CASES
    device = torch.device("cuda")
    bandwidth = measure_bandwidth(device)
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # noqa: E731 - µs
    print(f"copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}; {sm_count(device)} SMs", flush=True)
    print(f"{'rows':>5s} {'held':>6s} {'cache':>6s} {'launch':>6s} {'splits':>6s} {'us':>8s} {'GB/s':>7s} {'of copy':>8s}",
          flush=True)
    results = []
    for rows, held, cache_len in cases:
        g = torch.Generator(device=device).manual_seed(rows * held)
        nb = blocks_for(cache_len)
        pool = rows * nb + 1
        k = torch.randn(pool, KV_HEADS, BLOCK_TOKENS, DIM, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        table = (torch.randperm(rows * nb, device=device, generator=g) + 1).view(rows, nb).to(torch.int32)
        q = torch.randn(rows, HEADS, DIM, device=device, dtype=torch.bfloat16, generator=g)
        lengths = torch.full((rows,), held, device=device, dtype=torch.int32)
        torch.cuda.synchronize()  # do_bench_cudagraph runs on a stream of its own, which does not wait for these
        moved = rows * held * KV_HEADS * DIM * 2 * 2 + 2 * q.numel() * 2
        default = splits_for(rows, KV_HEADS, cache_len, sm_count(device))
        for launch in args.launch:
            warps, stages = (int(x) for x in launch.split("x"))
            for splits in sorted(set(s for s in args.splits if s <= MAX_SPLITS * 2) | {default}):
                us = bench(lambda: decode_attention_impl(q, k, v, table, lengths, None, None, splits=splits,
                                                         num_warps=warps, num_stages=stages))
                gbs = moved / us / 1e3
                mark = " (default)" if splits == default and launch == "4x2" else ""
                print(f"{rows:5d} {held:6d} {cache_len:6d} {launch:>6s} {splits:6d} {us:8.1f} {gbs:7.0f} "
                      f"{gbs / bandwidth:8.1%}{mark}", flush=True)
                results.append({"rows": rows, "held": held, "cache_len": cache_len, "launch": launch, "splits": splits,
                                "us": us, "gb_s": gbs, "default": bool(mark)})
    print(json.dumps({**machine_info(), "bandwidth_gbs": bandwidth, "results": results}))


if __name__ == "__main__":
    main()
