"""Where a GPU decode step's time goes, on the Llama-3.1-8B shape: the engine's compiled decode step
(CUDA graphs) profiled kernel by kernel, against the two floors a step cannot go under.

    python benchmarks/profile_decode.py [--batch 1] [--quant bf16 w4g128] [--steps 10] [--prompt-len 128]

For each weight format, one table:
- the step: wall time per step (CUDA events over ``--steps`` steps) and, from the kernel timeline, how
  much of it kernels run, the gaps between kernels inside a step (launch-to-launch latency in a graph)
  and the host time between steps;
- kernels by kind (weight matmuls, attention, Inductor's fused pointwise/norm kernels, the rest):
  launches and microseconds per step, and for the matmuls the GB/s they reach on the weights they read;
- the largest kernels by name.

Then the floors, measured in the same process: a chain of dependent tiny kernels replayed from one CUDA
graph (what any launch costs, however little it does), and every bf16 matmul of one step (32 layers x
qkv, o, gate/up, down, and the head) back to back in one graph with nothing else (what cuBLAS alone
reaches on these shapes, each weight read once, as in a step). Their gap to the step is the price of the
other kernels and of the launches between them. A diagnostic printed to stdout (and a JSON line), not a
benchmark record of speed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch

from benchmarks.engine_gpu import llama31_8b_config, quant_configs, random_hf_model
from quantdeploy.bench.decode import measure_bandwidth, weight_bytes
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.eval.report import machine_info
from quantdeploy.models.bundle import ModelBundle, SourceInfo


SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
HEAD = (128256, 4096)
MATMUL_NAMES = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk", "_wonly", "_scaled_mm")
ATTENTION_NAMES = ("_split_kernel", "_combine_kernel", "attention", "flash", "fmha", "sdpa")


def kind_of(name: str) -> str:
    low = name.lower()
    if any(s in low for s in ATTENTION_NAMES):
        return "attention"
    if any(s in low for s in MATMUL_NAMES):
        return "matmul"
    if low.startswith("triton_"):
        return "inductor fused"
    return "other"


def graph_time_us(fn, replays: int = 20) -> float:
    """Microseconds per replay of ``fn`` captured in one CUDA graph (median of ``replays``)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def launch_floor(launches: int = 512) -> float:
    """Microseconds per kernel of a chain of ``launches`` dependent one-element adds in one graph."""
    x = torch.zeros(1, device="cuda")

    def chain() -> None:
        for _ in range(launches):
            x.add_(1.0)

    return graph_time_us(chain) / launches


def matmul_floor(batch: int, layers: int) -> tuple[float, int]:
    """(microseconds, weight bytes) of one step's bf16 matmuls alone, back to back in one graph."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(layers)
               for n, k in SHAPES.values()] + [torch.randn(*HEAD, device="cuda", dtype=torch.bfloat16)]
    inputs = {k: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}

    def step() -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    us = graph_time_us(step)
    return us, sum(w.numel() * w.element_size() for w in weights)


def kernel_timeline(engine: Engine, steps: int) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every GPU kernel of ``steps`` decode steps, in start order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
               if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda k: k[1])


def analyse(kernels: list[tuple[str, float, float]], steps: int, step_us: float, read_bytes: int,
            host_gap_us: float = 30.0) -> dict:
    """Busy time, gaps inside a step (< ``host_gap_us``) and between steps, and time by kernel kind."""
    busy = sum(d for _, _, d in kernels)
    small, large = 0.0, 0.0
    for (_, s0, d0), (_, s1, _) in zip(kernels, kernels[1:]):
        gap = max(0.0, s1 - (s0 + d0))
        if gap < host_gap_us:
            small += gap
        else:
            large += gap
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    names: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, _, d in kernels:
        for table, key in ((kinds, kind_of(name)), (names, name)):
            table[key][0] += 1
            table[key][1] += d
    per = {k: {"launches": n / steps, "us": us / steps} for k, (n, us) in kinds.items()}
    if "matmul" in per:
        per["matmul"]["gb_s"] = read_bytes / per["matmul"]["us"] / 1e3
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
    return {"step_us": step_us, "kernels_per_step": len(kernels) / steps, "busy_us": busy / steps,
            "gaps_in_step_us": small / steps, "between_steps_us": large / max(1, steps - 1), "kinds": per,
            "top": [{"name": n[:80], "launches": c / steps, "us": us / steps} for n, (c, us) in top]}


def profile_format(name: str, batch: int, steps: int, prompt_len: int = 128) -> dict:
    hf = random_hf_model(llama31_8b_config(), "cuda")
    bundle = ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="random", kind="memory"))
    config = quant_configs()[name]
    if config is not None:
        import quantdeploy as qd

        bundle = qd.quantize(bundle, config, device="cuda")
    new_tokens = 10 * steps + 100
    engine = Engine.from_bundle(bundle, "cuda", max_batch=batch, max_seq_len=max(2048, prompt_len + batch + new_tokens))
    for i in range(batch):
        engine.add([100 + j % 30000 for j in range(prompt_len + i)], SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    while engine._unfilled or engine._chunking:  # prefill (long prompts a chunk per step)
        engine.step()
    for _ in range(8):  # compile, capture
        engine.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4 * steps):
        engine.step()
    end.record()
    torch.cuda.synchronize()
    step_us = 1e3 * start.elapsed_time(end) / (4 * steps)
    total, embedding = weight_bytes(engine.model)
    result = analyse(kernel_timeline(engine, steps), steps, step_us, total - embedding)
    result["weights_read_gb"] = (total - embedding) / 1e9
    a = engine.model.args  # the keys and values a step reads: each row's context, every layer
    held = sum(len(s.prompt_ids) + len(s.output_ids) for s in engine.running)
    result["kv_read_gb"] = held * a.n_layers * 2 * a.n_kv_heads * a.head_dim * 2 / 1e9
    del engine, bundle, hf
    torch.cuda.empty_cache()
    return result


def print_format(name: str, r: dict, bandwidth: float) -> None:
    ideal = (r["weights_read_gb"] + r["kv_read_gb"]) * 1e6 / bandwidth
    print(f"\n{name}: step {r['step_us']:.0f} us (weights {r['weights_read_gb']:.2f} GB + KV {r['kv_read_gb']:.2f} GB: "
          f"{ideal:.0f} us at copy bandwidth, {100 * ideal / r['step_us']:.1f}% of roofline); {r['kernels_per_step']:.0f} kernels a step")
    print(f"  kernels running {r['busy_us']:.0f} us, gaps between kernels {r['gaps_in_step_us']:.0f} us, "
          f"host time between steps {r['between_steps_us']:.0f} us")
    print(f"  {'kind':16s} {'launches':>9s} {'us/step':>9s} {'share':>7s}")
    for kind, v in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["us"]):
        extra = f"  {v['gb_s']:.0f} GB/s on the weights ({100 * v['gb_s'] / bandwidth:.1f}% of copy)" if "gb_s" in v else ""
        print(f"  {kind:16s} {v['launches']:9.0f} {v['us']:9.0f} {100 * v['us'] / r['step_us']:6.1f}%{extra}")
    print(f"  largest kernels: {'launches':>8s} {'us/step':>8s}")
    for t in r["top"]:
        print(f"    {t['name'][:60]:60s} {t['launches']:6.0f} {t['us']:8.0f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quant", nargs="+", default=["bf16"], choices=sorted(quant_configs()),
                   help="weight formats of the profiled engine (RTN etc. on the random weights)")
    p.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens of each row's prompt (8192: long context)")
    args = p.parse_args()
    bandwidth = measure_bandwidth(torch.device("cuda"))
    floor_us = launch_floor()
    mm_us, mm_bytes = matmul_floor(args.batch, 32)
    torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.0f} GB/s, batch {args.batch}")
    print(f"floor: a dependent tiny kernel in a CUDA graph costs {floor_us:.2f} us")
    print(f"floor: one step's bf16 matmuls alone, back to back in one graph: {mm_us:.0f} us for "
          f"{mm_bytes / 1e9:.2f} GB ({mm_bytes / mm_us / 1e3:.0f} GB/s, {100 * mm_bytes / mm_us / 1e3 / bandwidth:.1f}% of copy)")
    results = {}
    for name in args.quant:
        results[name] = profile_format(name, args.batch, args.steps, args.prompt_len)
        print_format(name, results[name], bandwidth)
    info = machine_info()
    info.update({"benchmark": "profile_decode", "config": vars(args), "bandwidth_gbs": bandwidth,
                 "launch_floor_us": floor_us, "bf16_matmuls_alone_us": mm_us, "bf16_matmul_bytes": mm_bytes,
                 "formats": results})
    print(json.dumps(info))


if __name__ == "__main__":
    main()
