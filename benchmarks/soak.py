"""Soak: the server under mixed, partly hostile load for a long time; nothing grows and nothing is lost.

    python benchmarks/soak.py CHECKPOINT [--minutes 30] [--max-batch 4] [--max-queue 8] [--json OUT]

Starts ``quantdeploy serve`` as a subprocess and drives it from several client loops at once, each with
its own kind of request:

- ``stream``: streamed completions read to ``[DONE]``;  ``plain``: non-streamed completions and chats;
- ``cancel``: a stream the client drops after a few chunks (the server must free the row);
- ``slow``: a stream read with a pause between chunks (a slow reader holds its row longer);
- ``bad``: malformed JSON, an unknown model, a body over the size limit (chunked and by header),
  a wrong field type, an empty prompt;
- ``burst``: every few seconds more simultaneous requests than rows plus queue (some get 429).

Every ``--sample`` seconds it records the server process's resident memory and open file descriptors
(from /proc). At the end it checks: every request the clients sent is accounted for in the server's
``quantdeploy_requests_total`` (by status), none ended in a 5xx or a broken stream, and memory and file
descriptors did not grow (the last fifth of the run against the first fifth after warm-up). It prints a
table, the verdict, and a last JSON line (machine, commit, config, samples); exit code 1 on a failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from quantdeploy.eval.report import machine_info

WORDS = "the river city music history science water light time people year world life work".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, int]:
    """Resident memory (MiB) and open file descriptors of ``pid`` and its children."""
    pids = [pid]  # its threads share both; child processes (an engine process on a GPU) are added
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    rss, fds = 0.0, 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return rss, fds


class Tally:
    """What the clients sent and how each request ended, as the client saw it."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: dict[str, int] = {}
        self.last = ""

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.last = outcome


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, tally: Tally, drop_after: int | None = None,
                  pause: float = 0.0) -> None:
    tally.sent += 1
    try:
        async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as r:
            if r.status != 200:
                await r.read()
                tally.add(f"http_{r.status}")
                return
            chunks, done, finished = 0, False, False
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    tally.add("dropped")  # the client hangs up: the server counts it as cancelled
                    return
                if pause:
                    await asyncio.sleep(pause)
            tally.add("stream_ok" if done and finished else "stream_broken")
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        tally.add(f"client_error:{type(err).__name__}")


async def _post(session: aiohttp.ClientSession, url: str, path: str, tally: Tally, **kwargs) -> None:
    tally.sent += 1
    try:
        async with session.post(f"{url}{path}", **kwargs) as r:
            await r.read()
            tally.add("ok" if r.status == 200 else f"http_{r.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        tally.add(f"client_error:{type(err).__name__}")


async def _chunked(data: bytes):
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]


async def drive(url: str, model: str, seconds: float, max_tokens: int, burst: int, seed: int) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=120)

    async def loop(kind: str) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < end:
                body = {"model": model, "prompt": _prompt(rng), "max_tokens": rng.randint(1, max_tokens),
                        "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5}
                if kind == "stream":
                    await _stream(session, url, body, tally)
                elif kind == "cancel":
                    await _stream(session, url, {**body, "max_tokens": max_tokens, "ignore_eos": True}, tally,
                                  drop_after=rng.randint(1, 3))
                elif kind == "slow":
                    await _stream(session, url, body, tally, pause=0.05)
                elif kind == "plain":
                    if rng.random() < 0.5:
                        await _post(session, url, "/v1/completions", tally, json=body)
                    else:
                        await _post(session, url, "/generate", tally,
                                    json={"prompt": body["prompt"], "max_length": body["max_tokens"]})
                elif kind == "bad":
                    choice = rng.randrange(6)
                    if choice == 0:
                        await _post(session, url, "/v1/completions", tally, data=b'{"prompt": "x", ',
                                    headers={"content-type": "application/json"})
                    elif choice == 1:
                        await _post(session, url, "/v1/completions", tally, json={**body, "model": "no-such-model"})
                    elif choice == 2:
                        await _post(session, url, "/v1/completions", tally, data=_chunked(b"x" * (2 << 20)),
                                    headers={"content-type": "application/json"})
                    elif choice == 3:
                        await _post(session, url, "/v1/completions", tally, data=b" " * (2 << 20),
                                    headers={"content-type": "application/json"})
                    elif choice == 4:
                        await _post(session, url, "/v1/completions", tally, json={**body, "temperature": "hot"})
                    else:
                        await _post(session, url, "/v1/completions", tally, json={**body, "prompt": ""})
                    await asyncio.sleep(0.05)
                elif kind == "burst":
                    await asyncio.gather(*(_post(session, url, "/v1/completions", tally,
                                                 json={**body, "max_tokens": 4}) for _ in range(burst)))
                    await asyncio.sleep(3.0)
                if kind != "burst" and tally.last == "http_429":
                    await asyncio.sleep(1.0)  # the server's Retry-After, as a well-behaved client waits

    await asyncio.gather(*(loop(kind) for kind in ("stream", "stream", "cancel", "slow", "plain", "bad", "burst")))
    return tally


def server_counts(url: str) -> dict[str, float]:
    import httpx

    counts = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("quantdeploy_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = float(line.split()[-1])
    return counts


def growth(samples: list[dict], key: str) -> tuple[float, float]:
    """Median of ``key`` over the first fifth (after the first sample, the warm-up) and the last fifth."""
    body = samples[1:] if len(samples) > 2 else samples
    fifth = max(1, len(body) // 5)
    return statistics.median(s[key] for s in body[:fifth]), statistics.median(s[key] for s in body[-fifth:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint or model folder to serve")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--sample", type=float, default=10.0, help="seconds between memory/fd samples")
    p.add_argument("--rss-growth-mb", type=float, default=64.0, help="allowed growth of resident memory")
    p.add_argument("--fd-growth", type=int, default=8, help="allowed growth of open file descriptors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "quantdeploy", "serve", args.model, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
                               "--max-new-tokens", str(args.max_tokens), "--model-name", "soak",
                               "--shutdown-deadline", "5"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            print(server.stderr.read(), file=sys.stderr)
            return 1
        time.sleep(0.2)

    samples: list[dict] = []
    started = time.monotonic()

    async def sampler(seconds: float) -> None:
        while time.monotonic() - started < seconds:
            rss, fds = proc_stats(server.pid)
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1), "fds": fds})
            await asyncio.sleep(args.sample)

    async def everything() -> Tally:
        seconds = 60 * args.minutes
        tally, _ = await asyncio.gather(drive(url, "soak", seconds, args.max_tokens, args.max_batch + args.max_queue + 4,
                                              args.seed), sampler(seconds))
        return tally

    tally = asyncio.run(everything())
    time.sleep(1.0)  # cancellations of the last dropped streams reach the metrics
    counts = server_counts(url)
    rss, fds = proc_stats(server.pid)
    samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1), "fds": fds})
    server.send_signal(signal.SIGINT)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
    stderr = server.stderr.read()

    accounted = int(sum(counts.values()))
    rss0, rss1 = growth(samples, "rss_mb")
    fd0, fd1 = growth(samples, "fds")
    bad_client = {k: v for k, v in tally.outcomes.items()
                  if k.startswith(("client_error", "stream_broken")) or k.startswith("http_5")}
    checks = {
        "every request accounted for in /metrics": accounted == tally.sent,
        "no 5xx, broken stream or client error": not bad_client,
        f"resident memory grew < {args.rss_growth_mb:.0f} MiB": rss1 - rss0 < args.rss_growth_mb,
        f"open file descriptors grew <= {args.fd_growth}": fd1 - fd0 <= args.fd_growth,
        "server exited cleanly on SIGINT": server.returncode == 0 and "Traceback" not in stderr,
    }
    print(f"soak: {args.minutes:g} min, {tally.sent} requests sent; server counted {accounted}")
    print(f"{'client outcome':24s} {'count':>8s}")
    for name, n in sorted(tally.outcomes.items()):
        print(f"{name:24s} {n:8d}")
    print(f"{'server status':24s} {'count':>8s}")
    for name, n in sorted(counts.items()):
        print(f"{name:24s} {int(n):8d}")
    print(f"resident memory {rss0:.1f} -> {rss1:.1f} MiB, file descriptors {fd0:g} -> {fd1:g} "
          f"({len(samples)} samples, every {args.sample:g} s)")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if server.returncode != 0 or "Traceback" in stderr:
        print(stderr[-2000:], file=sys.stderr)
    record = {**machine_info(), "benchmark": "soak", "config": vars(args), "sent": tally.sent,
              "client_outcomes": tally.outcomes, "server_counts": counts, "samples": samples,
              "rss_mb": [rss0, rss1], "fds": [fd0, fd1], "checks": checks, "passed": all(checks.values())}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
