"""Short requests' inter-token latency with and without long prompts arriving among them, on one server,
Llama-3.1-8B shape with random bf16 weights.

    python benchmarks/serve_mixed_gpu.py --tokenizer TOKENIZER_DIR [--long-words 6000] [--long 4]

A ``quantdeploy serve`` per ``--prefill-chunk-tokens`` value (the random model saved as in
``serve_gpu.py``; ``--max-seq-len`` to hold the long prompts, ``--max-batch`` rows with ``--one-bucket``,
one compiled decode graph, so the server is ready in a minute). First the short load alone
(``--concurrency`` streams of 32-word prompts, ``--output-len`` tokens each), then the same short load
again with ``--long`` requests of ``--long-words``-word prompts (~1.2 tokens a word with SmolLM2's
tokenizer) sent two at a time alongside. For the short requests it reports each request's mean
inter-token latency (TPOT: the slowest request with the long prompts against the median one without),
the gaps' percentiles, and the longest gap each request saw, in both runs and as ratios, and how many of
the server's engine steps took longer than 50 / 100 / 200 / 300 ms in each run: a long prompt
prefilled whole stalls every decoding row for its prefill; prefilled in chunks a row waits one chunk at
a time. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.serve_gpu import save_random_model
from benchmarks.serve_throughput import _free_port, stop, wait_healthy
from quantdeploy.bench import loadtest
from quantdeploy.cli_run import freeze_client_heap
from quantdeploy.eval.report import machine_info


async def _loads(configs: list[loadtest.LoadConfig]) -> list[dict]:
    return list(await asyncio.gather(*(loadtest.run(c) for c in configs)))


def _line(name: str, result: dict) -> str:
    itl, worst = result["latency"]["itl_s"], result["latency"]["itl_max_s"]
    ms = lambda v: f"{1e3 * v:8.1f}" if v is not None else f"{'-':>8s}"  # noqa: E731
    tpot = result["latency"]["tpot_s"]
    return (f"{name:22s} {result['statuses']!s:16s} {ms(tpot['p50'])} {ms(tpot['max'])} {ms(itl['p50'])} {ms(itl['p90'])} {ms(itl['p99'])} "
            f"{ms(worst['p50'])} {ms(worst['p99'])} {ms(worst['max'])}")


def measure(folder: Path, chunk: int | None, args: argparse.Namespace) -> dict:
    """One server (``serve --prefill-chunk-tokens chunk``, None: serve's default): the short load alone, then
    with the long prompts among it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "quantdeploy", "serve", str(folder), "--port", str(port), "--device", args.device,
           "--max-seq-len", str(args.max_seq_len), "--max-batch", str(args.max_batch), "--one-bucket"]
    if chunk is not None:
        cmd += ["--prefill-chunk-tokens", str(chunk)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    short = loadtest.LoadConfig(url=url, requests=args.requests, concurrency=args.concurrency, prompt_len="32",
                                output_len=args.output_len)
    long = loadtest.LoadConfig(url=url, requests=args.long, concurrency=2, prompt_len=str(args.long_words),
                               output_len="16", seed=1, timeout=900.0)
    try:
        wait_healthy(url, server, 900, lambda: server.stderr.read()[-2000:])
        print(f"server ready (--prefill-chunk-tokens {chunk if chunk is not None else 'default'})", flush=True)
        asyncio.run(_loads([loadtest.LoadConfig(url=url, requests=args.concurrency, concurrency=args.concurrency,
                                                prompt_len="32", output_len="8")]))  # warm-up
        before = step_buckets(url)
        alone = asyncio.run(_loads([short]))[0]
        between = step_buckets(url)
        mixed, longs = asyncio.run(_loads([short, long]))
        after = step_buckets(url)
    finally:
        stop(server)
    print(f"{'short requests':22s} {'statuses':16s} {'TPOT p50':>8s} {'TPOT max':>8s} {'ITL p50':>8s} {'ITL p90':>8s} {'ITL p99':>8s} "
          f"{'worst50':>8s} {'worst99':>8s} {'worstmax':>8s}   (ms; worst = a request's longest gap)")
    print(_line("alone", alone))
    print(_line(f"with {args.long} long prompts", mixed))
    # tpot is a request's mean inter-token latency: the slowest short request with the long prompts
    # against the median one without them; then the gaps' percentiles, and each request's longest gap
    ratio = {k: mixed["latency"][s][q] / alone["latency"][s][r] for k, s, q, r in
             (("tpot_max/alone_p50", "tpot_s", "max", "p50"), ("itl_p50", "itl_s", "p50", "p50"),
              ("itl_p99", "itl_s", "p99", "p99"), ("worst_p99", "itl_max_s", "p99", "p99"),
              ("worst_max", "itl_max_s", "max", "max"))}
    print("with / alone: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print(f"long requests: {longs['statuses']}, TTFT p50 {longs['latency']['ttft_s']['p50']:.2f} s")
    steps = {"alone": {le: between[le] - before[le] for le in before}, "mixed": {le: after[le] - between[le] for le in before}}
    for name, counts in steps.items():  # the server's own step times: is a long gap a long engine step?
        total = counts["+Inf"]
        over = ", ".join(f"> {le} s: {total - counts[le]:.0f}" for le in ("0.05", "0.1", "0.2", "0.3") if le in counts)
        print(f"engine steps ({name}): {total:.0f}; {over}")
    print(flush=True)
    return {"chunk": chunk, "alone": alone, "mixed": mixed, "long": longs, "ratios": ratio, "engine_steps": steps}


def step_buckets(url: str) -> dict[str, float]:
    """The server's cumulative histogram of engine step times (``quantdeploy_engine_step_seconds``), by bound."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("quantdeploy_engine_step_seconds_bucket"):
            out[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--folder", default="/tmp/quantdeploy-llama8b-random")
    p.add_argument("--requests", type=int, default=128, help="short requests per run")
    p.add_argument("--concurrency", type=int, default=32, help="short streams at once")
    p.add_argument("--max-batch", type=int, default=32, help="serve --max-batch (with --one-bucket: one compiled graph)")
    p.add_argument("--output-len", default="128", help="tokens per short request")
    p.add_argument("--long", type=int, default=4, help="long requests in the mixed run (two at a time)")
    p.add_argument("--long-words", type=int, default=6000)
    p.add_argument("--max-seq-len", type=int, default=8448, help="serve --max-seq-len: must hold the long prompts")
    p.add_argument("--prefill-chunk-tokens", type=int, nargs="+", default=[None],
                   help="serve --prefill-chunk-tokens, a server each (default: serve's own)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer model: a smoke test of the script")
    args = p.parse_args()
    folder = Path(args.folder + ("-tiny" if args.tiny else ""))
    save_random_model(folder, args.tokenizer, args.device, args.tiny)
    print("random model saved", flush=True)
    freeze_client_heap()  # the client's own collector pauses out of the gaps it measures (quantdeploy loadtest does this)
    runs = [measure(folder, chunk, args) for chunk in args.prefill_chunk_tokens]
    print(json.dumps({**machine_info(), "config": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
