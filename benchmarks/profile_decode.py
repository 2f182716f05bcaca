"""Where a GPU decode step's time goes: per-kernel CUDA time of the engine's compiled decode step on the
Llama-3.1-8B shape, and what cuBLAS achieves on each of the step's matmul shapes alone.

    python benchmarks/profile_decode.py [--batch 1] [--quant w4g128]

The per-shape table answers "how close to the copy bandwidth can one bf16 matmul at this batch get";
the kernel table answers "what else runs in a step". A diagnostic, not a benchmark record.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.engine_gpu import llama31_8b_config, quant_configs, random_hf_model
from quantdeploy.bench.decode import measure_bandwidth
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.models.bundle import ModelBundle, SourceInfo


def matmul_table(batch: int, bandwidth: float) -> None:
    shapes = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
              "output": (128256, 4096)}
    print(f"\ncuBLAS bf16 x[{batch}, k] @ W[n, k].T alone (rotating 8 weights so L2 does not help)")
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4 if n > 100000 else 8)]
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        for layout, fn, mats in (("x@W.T", torch.nn.functional.linear, ws),
                                 ("x@Wt ", torch.mm, [w.T.contiguous() for w in ws])):
            for w in mats:
                fn(x, w)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 50
            start.record()
            for i in range(reps):
                fn(x, mats[i % len(mats)])
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / reps
            gbs = n * k * 2 / ms / 1e6
            print(f"  {name:7s} {layout} {n:6d}x{k:5d}  {1e3 * ms:8.1f} us  {gbs:6.0f} GB/s  {100 * gbs / bandwidth:5.1f}% of copy")
            del mats
        del ws


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quant", default="bf16", choices=["bf16", "w4g128", "w8", "nf4", "fp8"],
                   help="weight format of the profiled engine (RTN on the random weights)")
    p.add_argument("--no-cudnn-sdpa", action="store_true", help="keep SDPA off the cuDNN backend")
    args = p.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    bandwidth = measure_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    matmul_table(args.batch, bandwidth)
    hf = random_hf_model(llama31_8b_config(), "cuda")
    bundle = ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="random", kind="memory"))
    config = quant_configs()[args.quant]
    if config is not None:
        import quantdeploy as qd

        bundle = qd.quantize(bundle, config, device="cuda")
    engine = Engine.from_bundle(bundle, "cuda", max_batch=args.batch, max_seq_len=256)
    for i in range(args.batch):
        engine.add(list(range(100, 164 + i)), SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))


if __name__ == "__main__":
    main()
