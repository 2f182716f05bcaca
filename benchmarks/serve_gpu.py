"""GPU server throughput at 64 concurrent streams against the engine's offline throughput at batch 64,
Llama-3.1-8B shape with random bf16 weights, in one run on one card.

    python benchmarks/serve_gpu.py --tokenizer TOKENIZER_DIR [--requests 200] [--engines process thread]

The random model is saved once as an HF folder (with any tokenizer whose ids fit the vocabulary: the
prompts only need token ids; generated ids the tokenizer lacks decode to nothing, and throughput
counts tokens from the server's usage). Offline: ``Engine.generate`` on the load test's exact prompts,
batch 64, after a warm-up. Server: ``quantdeploy serve --max-batch 64 --one-bucket --engine MODE`` in a subprocess, warmed up, then
``loadtest`` with 64 concurrent streams, for each ``--engines`` mode (the engine loop in a process of
its own, as ``serve`` runs it on a GPU, or in a thread of the server). Both sides decode 64 rows per
step (one CUDA graph), prefill the requests that arrive together in one batch, and replay prefill
CUDA graphs captured before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.engine_gpu import llama31_8b_config, random_hf_model
from benchmarks.serve_throughput import describe_counts, describe_cpu, describe_server_times, serve_and_load
from quantdeploy.bench import loadtest
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.eval.report import machine_info


def save_random_model(folder: Path, tokenizer_dir: str, device: str, tiny: bool) -> None:
    from transformers import AutoTokenizer

    if (folder / "config.json").exists():
        return
    config = llama31_8b_config()
    if tiny:  # a smoke test of the whole flow on the CPU
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 256, 512
    model = random_hf_model(config, device)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model


def offline(folder: Path, args: argparse.Namespace) -> dict:
    engine = Engine.load(folder, args.device, max_batch=args.batch, max_seq_len=args.max_seq_len, buckets=(args.batch,))
    engine.warm_up()  # as the server does before it reports ready
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cfg = loadtest.LoadConfig(url="", requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len)
    jobs = loadtest.make_jobs(cfg)
    prompts = [engine.encode(p) for p, _ in jobs]
    params = SamplingParams(max_tokens=jobs[0][1], temperature=0, ignore_eos=True)
    engine.generate(prompts[: args.batch], params)  # compile and record the graph
    sync()
    before = dataclasses.asdict(engine.counters)
    t = time.perf_counter()
    done = engine.generate(prompts, params)
    sync()
    elapsed = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for c in done)
    counts = {k: v - before[k] for k, v in dataclasses.asdict(engine.counters).items()}
    del engine
    return {"output_tokens": tokens, "seconds": elapsed, "output_token_throughput": tokens / elapsed, "engine": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--folder", default="/tmp/quantdeploy-llama8b-random")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", default="32")
    p.add_argument("--output-len", default="64")
    p.add_argument("--max-seq-len", type=int, help="cache positions per row (default: serve's own, not passed to it)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--engines", nargs="+", choices=("process", "thread"), default=["process"],
                   help="quantdeploy serve --engine for each server run (all against the one offline number)")
    p.add_argument("--prefill-wait-steps", type=int, nargs="+", default=[0],
                   help="quantdeploy serve --prefill-wait-steps for each server run")
    p.add_argument("--tiny", action="store_true", help="2-layer model: a smoke test of the script")
    args = p.parse_args()
    folder = Path(args.folder)
    t = time.perf_counter()
    save_random_model(folder, args.tokenizer, args.device, args.tiny)
    print(f"random model saved in {time.perf_counter() - t:.0f} s", flush=True)
    off = offline(folder, args)
    print(f"offline engine, batch {args.batch}: {off['output_token_throughput']:.0f} output tok/s; "
          f"{describe_counts(off['engine'])}", flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    servers = {}
    for mode in args.engines:
        for wait in args.prefill_wait_steps:
            serve_args = argparse.Namespace(max_queue=256, max_seq_len=args.max_seq_len, device=args.device,
                                            warmup=args.batch, requests=args.requests, concurrency=args.batch,
                                            prompt_len=args.prompt_len, output_len=args.output_len, one_bucket=True,
                                            engine=mode, prefill_wait_steps=wait)
            served = serve_and_load(str(folder), args.batch, serve_args)
            ratio = served["output_token_throughput"] / off["output_token_throughput"]
            print(f"\nserver, engine loop in a {mode}, --prefill-wait-steps {wait}:\n{loadtest.table(served)}\n"
                  f"{describe_counts(served['engine'])}\n{describe_server_times(served['engine'])}\n{describe_cpu(served)}")
            print(f"server at {args.batch} concurrent streams / offline engine at batch {args.batch}: {ratio:.1%}",
                  flush=True)
            servers[f"{mode}/wait{wait}"] = {**{k: v for k, v in served.items() if k != "config"}, "ratio": ratio}
    print(json.dumps({**machine_info(), "config": vars(args), "offline": off, "servers": servers}))


if __name__ == "__main__":
    main()
