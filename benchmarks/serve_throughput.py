"""Server throughput with continuous batching against the same server at ``--max-batch 1``, in one run.

    python benchmarks/serve_throughput.py CHECKPOINT [--batches 64 1] [--requests 200] [--concurrency 64]

For each ``--max-batch`` it starts ``quantdeploy serve`` as a subprocess, waits for /health, runs
``quantdeploy loadtest`` (streamed completions, fixed prompt and output lengths, ignore_eos), stops the
server, and reports throughput and latency percentiles, then the ratio. Every request must end as
200 or 429: the script says how many did neither. Last line: JSON with machine, commit and config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from quantdeploy.bench import loadtest
from quantdeploy.eval.report import machine_info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_TIMES = {"queue": "quantdeploy_request_queue_time_seconds", "ttft": "quantdeploy_time_to_first_token_seconds",
                "e2e": "quantdeploy_e2e_request_latency_seconds"}


def engine_counts(url: str) -> dict[str, float]:
    """The server's ``quantdeploy_engine_*_total`` counters, and the sum and count of its latency
    histograms (``queue_sum``, ``queue_count``, ...), from /metrics."""
    out = {}
    sums = {f"{metric}_{part}": f"{short}_{part}" for short, metric in SERVER_TIMES.items() for part in ("sum", "count")}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("quantdeploy_engine_") and "_total " in line:
            name, value = line.split()
            out[name[len("quantdeploy_engine_"):-len("_total")]] = float(value)
        elif line.split(" ")[0] in sums:
            name, value = line.split()
            out[sums[name]] = float(value)
    return out


def describe_server_times(counts: dict[str, float]) -> str:
    """One line: the server's own mean queue time (arrival to admission), TTFT and end-to-end latency."""
    means = [f"{short} {1000 * counts[f'{short}_sum'] / counts[f'{short}_count']:.1f} ms" for short in SERVER_TIMES
             if counts.get(f"{short}_count")]
    return "server-side means: " + ", ".join(means)


def describe_cpu(result: dict) -> str:
    """One line: CPU seconds of each process during the load test, against its wall time."""
    wall = result["duration_s"]
    busy = [f"{name} {t:.2f} s ({t / wall:.0%})" for name, t in result["cpu_seconds"].items() if t > 0]
    return "CPU during the load: " + ", ".join(busy)


def describe_counts(counts: dict[str, float]) -> str:
    """One line: prefill forwards and their mean size, decode steps and their mean batch."""
    batches, steps = counts.get("prefill_batches", 0), counts.get("decode_steps", 0)
    return (f"prefill forwards {batches:.0f} ({counts.get('prefill_sequences', 0) / max(batches, 1):.1f} sequences each), "
            f"decode steps {steps:.0f} ({counts.get('decode_rows', 0) / max(steps, 1):.1f} rows each), "
            f"engine idle {counts.get('idle_seconds', 0):.2f} s, waiting on the device {counts.get('device_wait_seconds', 0):.2f} s")


def process_tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid`` and of each of its descendants, by name, from /proc
    (Linux): the server's HTTP process and its engine process, apart."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            stats[int(entry)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, out = {pid}, {}
    for _ in range(4):  # descendants a few levels down
        tree |= {p for p, (_, parent, _) in stats.items() if parent in tree}
    for p in sorted(tree):
        if p in stats:
            name = "server" if p == pid else f"{stats[p][0]}-{p}"
            out[name] = stats[p][2]
    return out


def wait_healthy(url: str, server: subprocess.Popen, seconds: float, output) -> None:  # noqa: ANN001 - () -> str
    """Until ``url``/health answers 200; a server that exits first (``output()``: its last words) or a
    deadline passed ends the benchmark."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {output()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/health did not answer 200 within {seconds:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """SIGINT (the server drains), then a kill after a minute."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def serve_and_load(model: str, max_batch: int, args: argparse.Namespace) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "quantdeploy", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(args.max_queue), "--device", args.device]
    if args.max_seq_len is not None:  # None: the server's default
        cmd += ["--max-seq-len", str(args.max_seq_len)]
    if getattr(args, "one_bucket", False):
        cmd.append("--one-bucket")
    if getattr(args, "engine", None):
        cmd += ["--engine", args.engine]
    if getattr(args, "dtype", None):
        cmd += ["--dtype", args.dtype]
    if getattr(args, "compile", False):
        cmd.append("--compile")
    if getattr(args, "prefill_wait_steps", None) is not None:
        cmd += ["--prefill-wait-steps", str(args.prefill_wait_steps)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 600, lambda: server.stderr.read()[-2000:])
        if args.warmup:
            asyncio.run(loadtest.run(loadtest.LoadConfig(url=url, requests=args.warmup, concurrency=max_batch,
                                                         prompt_len=args.prompt_len, output_len=args.output_len)))
        cfg = loadtest.LoadConfig(url=url, requests=args.requests, concurrency=args.concurrency,
                                  prompt_len=args.prompt_len, output_len=args.output_len)
        before, cpu_before, client_before = engine_counts(url), process_tree_cpu(server.pid), time.process_time()
        result = asyncio.run(loadtest.run(cfg))
        client_cpu = time.process_time() - client_before
        after, cpu_after = engine_counts(url), process_tree_cpu(server.pid)
        cpu = {name: round(t - cpu_before.get(name, 0.0), 3) for name, t in cpu_after.items()}
        return {**result, "engine": {k: after[k] - before.get(k, 0) for k in after},
                "cpu_seconds": {**cpu, "load generator": round(client_cpu, 3)}}
    finally:
        stop(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", default="32")
    p.add_argument("--output-len", default="32")
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=0, help="requests sent before timing (e.g. to record CUDA graphs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=("auto", "process", "thread"), default="auto", help="quantdeploy serve --engine")
    p.add_argument("--prefill-wait-steps", type=int, help="quantdeploy serve --prefill-wait-steps (default: its default)")
    args = p.parse_args()
    results = {}
    for b in args.batches:
        results[b] = serve_and_load(args.model, b, args)
        print(f"\n--max-batch {b}\n{loadtest.table(results[b])}\n{describe_counts(results[b]['engine'])}\n"
              f"{describe_server_times(results[b]['engine'])}\n"
              f"{describe_cpu(results[b])}", flush=True)
    lost = {b: r["requests"] - r["statuses"].get("ok", 0) - r["statuses"].get("http_429", 0) for b, r in results.items()}
    print(f"\nrequests neither completed nor answered 429: {lost}")
    if len(args.batches) > 1:
        first, last = args.batches[0], args.batches[-1]
        ratio = results[first]["output_token_throughput"] / results[last]["output_token_throughput"]
        print(f"output throughput --max-batch {first} / --max-batch {last}: {ratio:.2f}x")
    print(json.dumps({**machine_info(), "config": vars(args), "lost": lost,
                      "results": {b: {k: v for k, v in r.items() if k != "config"} for b, r in results.items()}}))


if __name__ == "__main__":
    main()
