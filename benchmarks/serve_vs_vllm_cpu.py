"""Our server against vLLM's CPU build on the same checkpoint, the same cores and the same load, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/serve_vs_vllm_cpu.py --model bundled --method rtn-w4-sym-g128 \
        [--requests 200 --concurrency 16 --output-len 32] [--rounds 2] [--dtype bfloat16]

The model is quantized with ``--method`` (or served unquantized with ``--method none``), saved, and
exported to compressed-tensors (``--vllm-model export``, the default) or not (``--vllm-model original``:
vLLM serves the unquantized model, the baseline issue 17 sets our INT8 and INT4 servers against); vLLM (``vllm-cpu`` 0.32.0 in an environment of its own, see
``export_check.py``; ``python -m vllm.entrypoints.openai.api_server``, bf16, ``OMP_NUM_THREADS`` = the
cores) serves the export, ours (``quantdeploy serve --max-batch CONCURRENCY``) serves the checkpoint;
each is started, waited for on ``/health``, warmed with a few requests, loaded with ``quantdeploy loadtest``
(streamed completions, fixed prompt and output lengths, ``ignore_eos``) and stopped, alternately for
``--rounds`` rounds. The table gives output tok/s, TTFT and TPOT percentiles per server and round, then
ours / vLLM as the median of each round's own ratio (the box drifts between rounds); the last line is JSON. Every request must complete: the script counts those that did not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path

import statistics

from export_check import ensure_vllm_venv, methods  # benchmarks/ is on sys.path when run as a script
from serve_throughput import _free_port, serve_and_load, stop, wait_healthy

from quantdeploy.bench import loadtest
from quantdeploy.eval.report import machine_info


def vllm_serve_and_load(python: Path, folder: Path, args: argparse.Namespace) -> dict:
    port = _free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", str(args.max_seq_len), "--gpu-memory-utilization", "0.25",
           "--no-enable-log-requests"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server, 900, lambda: (log.seek(0), log.read()[-3000:])[1])
            if args.warmup:
                asyncio.run(loadtest.run(loadtest.LoadConfig(url=url, requests=args.warmup, concurrency=args.concurrency,
                                                             prompt_len=args.prompt_len, output_len=args.output_len)))
            return asyncio.run(loadtest.run(loadtest.LoadConfig(
                url=url, requests=args.requests, concurrency=args.concurrency, prompt_len=args.prompt_len,
                output_len=args.output_len)))
        finally:
            stop(server)


def row(name: str, r: dict) -> str:
    def ms(series: str, stat: str) -> str:
        v = r["latency"][series][stat]
        return f"{1e3 * v:>8.0f}" if v is not None else f"{'-':>8}"

    return (f"{name:<18} {r['output_token_throughput']:>8.1f} {ms('ttft_s', 'mean')} {ms('ttft_s', 'p50')} "
            f"{ms('ttft_s', 'p99')} {ms('tpot_s', 'mean')} {ms('tpot_s', 'p50')} {ms('tpot_s', 'p99')} "
            f"{r['statuses'].get('ok', 0):>5d}/{r['requests']}")


def our_methods(qd) -> dict:  # noqa: ANN001 - export_check's, and the engine benchmark's int4/int8 with the head
    head = qd.TargetConfig(lm_head=True)
    return {**methods(qd, None),
            "rtn-w4-g32-head": qd.RTNConfig(bits=4, group_size=32, pin_group_size=True, targets=head),
            "rtn-w8-channel-head": qd.RTNConfig(bits=8, group_size=None, targets=head)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--method", default="rtn-w4-sym-g128", help="a method of export_check.py, rtn-w4-g32-head, "
                   "rtn-w8-channel-head, or 'none'")
    p.add_argument("--vllm-model", choices=("export", "original"), default="export",
                   help="vLLM serves our checkpoint's compressed-tensors export, or the unquantized model")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", default="32")
    p.add_argument("--output-len", default="32")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="our server with --compile (its decode step compiled)")
    p.add_argument("--one-bucket", action="store_true", help="our server with --one-bucket (one compiled graph)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="our server's compute dtype (--dtype; default: "
                   "the checkpoint's); vLLM always runs bf16")
    p.add_argument("--vllm-version", default="0.32.0")
    p.add_argument("--peer-venv", type=Path, default=Path.home() / ".cache" / "quantdeploy" / "peers")
    args = p.parse_args()

    import quantdeploy as qd

    python = ensure_vllm_venv(args.peer_venv / f"vllm-cpu-{args.vllm_version}", args.vllm_version)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = qd.load_model(args.model)
        if args.method == "none":
            base.model.save_pretrained(tmp / "model")
            base.tokenizer.save_pretrained(tmp / "model")
            ours_folder = vllm_folder = tmp / "model"
        else:
            qd.save(qd.quantize(base, our_methods(qd)[args.method]), tmp / "model")
            ours_folder = tmp / "model"
            if args.vllm_model == "export":
                qd.export(tmp / "model", tmp / "model-ct")
                vllm_folder = tmp / "model-ct"
            else:
                base.model.save_pretrained(tmp / "original")
                base.tokenizer.save_pretrained(tmp / "original")
                vllm_folder = tmp / "original"
        for i in range(args.rounds):
            results.append(("vLLM", i, vllm_serve_and_load(python, vllm_folder, args)))
            results.append(("ours", i, serve_and_load(str(ours_folder), args.concurrency, args)))
    print(f"\n{args.requests} requests, {args.concurrency} concurrent, {args.prompt_len}-word prompts, "
          f"{args.output_len} tokens, {os.cpu_count()} cores, method {args.method}, vLLM serving the "
          f"{'export' if args.method != 'none' and args.vllm_model == 'export' else 'unquantized model'}")
    print(f"{'server':<18} {'tok/s':>8} {'TTFT ms':>8} {'p50':>8} {'p99':>8} {'TPOT ms':>8} {'p50':>8} {'p99':>8} "
          f"{'ok':>9}")
    for name, i, r in results:
        print(row(f"{name} (round {i + 1})", r))
    tok_s = {(n, i): r["output_token_throughput"] for n, i, r in results}
    ratio = statistics.median(tok_s["ours", i] / tok_s["vLLM", i] for i in range(args.rounds))
    lost = {f"{n}-{i}": r["requests"] - r["statuses"].get("ok", 0) for n, i, r in results}
    print(f"output throughput ours / vLLM (median of the rounds' ratios): {ratio:.2f}x; requests not completed: {lost}")
    print(json.dumps({**machine_info(), "benchmark": "serve_vs_vllm_cpu", "config": {**vars(args), "peer_venv": None},
                      "ours_vs_vllm": ratio, "lost": lost,
                      "results": [{"server": n, "round": i, **{k: v for k, v in r.items() if k != "config"}}
                                  for n, i, r in results]}))


if __name__ == "__main__":
    main()
