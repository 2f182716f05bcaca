"""What a long prompt's prefill costs the rows that are decoding meanwhile: step times of the engine with
and without it, chunks run eagerly or replayed from CUDA graphs, on the Llama-3.1-8B shape.

    python benchmarks/chunked_prefill_gpu.py [--rows 32] [--long 7200] [--variants eager:2048 graph:2048 graph:512]

Why: a prompt longer than ``prefill_chunk_tokens`` goes one chunk per engine step, and every decoding row
waits for that step, so the chunk's cost is each short request's longest inter-token gap under a mixed
load (``benchmarks/serve_mixed_gpu.py`` measures it through the server). Here the engine runs alone, in
one process: ``--rows`` sequences of short prompts decode; their step time is measured alone, then a
``--long``-token prompt joins and every step until its first token is timed (wall time between two
``step()`` returns: the engine keeps one step queued, so this is what a serving loop sees). A variant is
``eager:C`` (chunks of C tokens, eager forwards; ``prefill_graph_tokens=0``) or ``graph:C`` (the engine's
default on CUDA: chunk graphs). Random bf16 weights. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.engine_gpu import llama31_8b_config, random_hf_model
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.eval.report import machine_info
from quantdeploy.models.bundle import ModelBundle, SourceInfo


def timed_steps(engine: Engine, n: int, until=None) -> list[float]:  # noqa: ANN001
    """Milliseconds of each of ``n`` steps (or of steps until ``until()`` is true)."""
    times = []
    last = time.perf_counter()
    while (until is None and len(times) < n) or (until is not None and not until()):
        engine.step()
        now = time.perf_counter()
        times.append(1e3 * (now - last))
        last = now
    return times


def measure(bundle: ModelBundle, variant: str, args: argparse.Namespace) -> dict:
    mode, chunk = variant.split(":")
    engine = Engine.from_bundle(bundle, args.device, max_batch=args.rows, max_seq_len=args.max_seq_len, buckets=(args.rows,),
                                prefill_chunk_tokens=int(chunk), prefill_graph_tokens=0 if mode == "eager" else None)
    start = time.perf_counter()
    engine.warm_up()
    warm_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    short = SamplingParams(max_tokens=args.max_seq_len - 64, ignore_eos=True)
    for _ in range(args.rows - 1):  # one row left for the long prompt
        engine.add(torch.randint(100, 30000, (40,), generator=g).tolist(), short)
    timed_steps(engine, 8)  # prefill, first steps
    alone = timed_steps(engine, args.steps)
    long_seq = engine.add(torch.randint(100, 30000, (args.long,), generator=g).tolist(),
                          SamplingParams(max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    with_long = timed_steps(engine, 0, until=lambda: len(long_seq.output_ids) > 0)
    ttft = time.perf_counter() - t0
    after = timed_steps(engine, args.steps)
    chunk_graphs = sorted(k[1] for k in engine.prefill_graphs.graphs if k[0] == 0) if engine.prefill_graphs else []
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "warm_up_s": warm_s, "alone_ms": alone, "with_long_ms": with_long, "after_ms": after,
            "ttft_s": ttft, "chunk_graphs": chunk_graphs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32, help="decode rows (the long prompt takes one)")
    p.add_argument("--long", type=int, default=7200, help="tokens of the long prompt")
    p.add_argument("--max-seq-len", type=int, default=8448)
    p.add_argument("--steps", type=int, default=30, help="steps timed alone and after")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["eager:2048", "graph:2048", "graph:512"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 256-wide model: a smoke test of the script (on the CPU: eager only)")
    args = p.parse_args()
    config = llama31_8b_config()
    config.num_hidden_layers = args.layers
    if args.tiny:
        config.hidden_size, config.intermediate_size = 256, 512
    hf = random_hf_model(config, args.device)
    bundle = ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="random", kind="memory"))
    results = [measure(bundle, v, args) for v in args.variants]
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{card}; Llama-3.1-8B shape, {args.layers} layers, bf16; {args.rows - 1} rows decoding, "
          f"then a {args.long}-token prompt joins (max_seq_len {args.max_seq_len})")
    print(f"{'variant':12s} {'alone p50':>9s} {'alone max':>9s} {'steps':>5s} {'with p50':>9s} {'with max':>9s} "
          f"{'max/alone':>9s} {'TTFT s':>7s} {'warm s':>6s}   (ms a step)")
    for r in results:
        a50, amax = statistics.median(r["alone_ms"]), max(r["alone_ms"])
        w50, wmax = statistics.median(r["with_long_ms"]), max(r["with_long_ms"])
        r.update(alone_p50=a50, alone_max=amax, with_p50=w50, with_max=wmax)
        print(f"{r['variant']:12s} {a50:9.1f} {amax:9.1f} {len(r['with_long_ms']):5d} {w50:9.1f} {wmax:9.1f} "
              f"{wmax / a50:8.2f}x {r['ttft_s']:7.2f} {r['warm_up_s']:6.1f}")
        print(f"  steps with the long prompt: {' '.join(f'{t:.0f}' for t in r['with_long_ms'])}")
    info = machine_info()
    info.update({"benchmark": "chunked_prefill_gpu", "config": vars(args), "results": results})
    print(json.dumps(info))


if __name__ == "__main__":
    main()
