"""An HTTP load generator for OpenAI-compatible servers, in the manner of vLLM's benchmark_serving.

Requests are streamed completions with random-word prompts and fixed or uniformly drawn prompt and
output lengths (``"64"`` or ``"32:128"``); ``ignore_eos`` makes outputs run to their length on servers
that accept it (ours and vLLM). Load is a number of concurrent clients, or a Poisson arrival rate.
Per request it records TTFT (first text), ITL (gaps between streamed chunks), TPOT ((e2e − TTFT) /
(output tokens − 1)) and end-to-end latency; output tokens come from the usage the server reports.
Every request ends as ok, as an HTTP status (429 counted apart) or as a client-side error: none is
silently dropped, and a request still unanswered after ``timeout`` counts as a timeout. The client is
aiohttp, as in benchmark_serving: at 64 streams httpx spent ~270 µs of CPU per streamed chunk here
(aiohttp ~45 µs), enough to make the load generator, not the server, the bottleneck.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from typing import Any

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river city music history science water light").split()


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    url: str
    requests: int = 200
    concurrency: int | None = 64
    rate: float | None = None  # requests/s (Poisson); overrides concurrency
    duration: float | None = None  # stop issuing new requests after this many seconds
    prompt_len: str = "32"
    output_len: str = "32"
    model: str | None = None
    api_key: str | None = None
    timeout: float = 300.0
    seed: int = 0


def _draw(spec: str, rng: random.Random) -> int:
    lo, _, hi = spec.partition(":")
    return rng.randint(int(lo), int(hi)) if hi else int(lo)


@dataclasses.dataclass
class Outcome:
    status: str  # ok | http_<code> | timeout | error
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0


async def _one(client: Any, cfg: LoadConfig, prompt: str, max_tokens: int) -> Outcome:
    body = {"model": cfg.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    start = time.perf_counter()
    out = Outcome("ok")
    last = None
    try:
        async with client.post(cfg.url.rstrip("/") + "/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return Outcome(f"http_{r.status}")
            async for raw in r.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome("error")
                now = time.perf_counter()
                if chunk.get("usage"):
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if out.ttft is None:
                        out.ttft = now - start
                    elif last is not None:
                        out.itl.append(now - last)
                    last = now
    except asyncio.TimeoutError:
        return Outcome("timeout")
    except Exception as err:  # connection refused/reset: reported, never dropped
        return Outcome("timeout" if "Timeout" in type(err).__name__ else "error")
    out.e2e = time.perf_counter() - start
    return out


def make_jobs(cfg: LoadConfig) -> list[tuple[str, int]]:
    """The (prompt, max_tokens) pairs of a load test: the same for the same config and seed."""
    rng = random.Random(cfg.seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(_draw(cfg.prompt_len, rng))), _draw(cfg.output_len, rng))
            for _ in range(cfg.requests)]


async def run(cfg: LoadConfig) -> dict[str, Any]:
    import aiohttp  # a client must cost less than the server it measures: httpx takes ~6x the CPU per chunk

    rng = random.Random(cfg.seed + 1)
    jobs = make_jobs(cfg)
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=max(cfg.concurrency or 0, 256))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as client:
        if cfg.model is None:
            cfg = dataclasses.replace(cfg, model=await served_model(client, cfg))
        start = time.perf_counter()
        if cfg.rate:
            tasks = []
            for prompt, n in jobs:
                if cfg.duration and time.perf_counter() - start > cfg.duration:
                    break
                tasks.append(asyncio.create_task(_one(client, cfg, prompt, n)))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            outcomes = list(await asyncio.gather(*tasks))
        else:
            queue = list(reversed(jobs))

            async def worker() -> None:
                while queue and not (cfg.duration and time.perf_counter() - start > cfg.duration):
                    prompt, n = queue.pop()
                    outcomes.append(await _one(client, cfg, prompt, n))

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency or 1)))
    return summarize(outcomes, time.perf_counter() - start, cfg)


async def served_model(client: Any, cfg: LoadConfig) -> str:
    """The first model ``GET /v1/models`` lists; a server that cannot be reached or is not ready is a
    one-line error before any load is sent (a load test of nothing would report zero throughput)."""
    import aiohttp

    from quantdeploy.errors import ConfigError

    url = cfg.url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with client.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=min(cfg.timeout, 30))) as r:
            if r.status != 200:
                detail = (await r.text())[:200].replace("\n", " ")
                raise ConfigError(f"{url} answered {r.status} ({detail}); is the server ready, and is --api-key right?")
            models = (await r.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
        raise ConfigError(f"cannot reach {cfg.url} ({type(err).__name__}: {err}); is the server running?") from None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ConfigError(f"{url} lists no model; pass --model NAME")
    return str(models[0]["id"])


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(outcomes: list[Outcome], elapsed: float, cfg: LoadConfig) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == "ok"]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    tokens = sum(o.output_tokens for o in ok)
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok if o.ttft is not None and o.output_tokens > 1]
    series = {"ttft_s": [o.ttft for o in ok if o.ttft is not None], "tpot_s": tpot,
              "itl_s": [x for o in ok for x in o.itl], "e2e_s": [o.e2e for o in ok if o.e2e is not None],
              "itl_max_s": [max(o.itl) for o in ok if o.itl]}  # each stream's longest stall
    return {
        "config": dataclasses.asdict(cfg), "duration_s": elapsed, "requests": len(outcomes), "statuses": statuses,
        "request_throughput": len(ok) / elapsed, "output_token_throughput": tokens / elapsed, "output_tokens": tokens,
        "latency": {name: {"mean": statistics.fmean(v) if v else None, "p50": _pct(v, 50), "p90": _pct(v, 90),
                           "p99": _pct(v, 99), "max": max(v, default=None)} for name, v in series.items()},
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"requests {result['requests']} in {result['duration_s']:.1f} s, statuses {result['statuses']}",
             f"throughput {result['request_throughput']:.2f} req/s, {result['output_token_throughput']:.1f} output tok/s",
             f"{'metric':8s} {'mean ms':>9s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s}"]
    for name, stats in result["latency"].items():
        cells = " ".join(f"{1e3 * stats[k]:9.1f}" if stats[k] is not None else f"{'-':>9s}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name[:-2]:8s} {cells}")
    return "\n".join(lines)
