"""The load generator against the real server (tiny model, CPU): every request accounted for, the
server's token counts used, 429s counted apart, and the same jobs for the same seed."""

from __future__ import annotations

import asyncio

import pytest

from quantdeploy.bench import loadtest
from quantdeploy.engine.engine import Engine
from quantdeploy.serve.app import ServeConfig
from tests.serve.test_server import serving


def test_make_jobs_draws_lengths_from_the_ranges_and_repeats_for_a_seed():
    cfg = loadtest.LoadConfig(url="", requests=50, prompt_len="3:9", output_len="4:6", seed=5)
    jobs = loadtest.make_jobs(cfg)
    assert jobs == loadtest.make_jobs(cfg) and jobs != loadtest.make_jobs(loadtest.LoadConfig(url="", seed=6))
    assert all(3 <= len(p.split()) <= 9 and 4 <= n <= 6 for p, n in jobs)
    assert {len(p.split()) for p, _ in jobs} != {3}


def test_load_against_the_server_counts_every_request(tiny_bundle):
    config = ServeConfig(model_name="tiny", max_queue=2, max_new_tokens=32)
    with serving(lambda: Engine.from_bundle(tiny_bundle, "cpu", max_batch=2, max_seq_len=128), config) as url:
        cfg = loadtest.LoadConfig(url=url, requests=12, concurrency=8, prompt_len="4", output_len="6")
        result = asyncio.run(loadtest.run(cfg))
    statuses = result["statuses"]
    assert result["requests"] == 12 and sum(statuses.values()) == 12
    assert set(statuses) <= {"ok", "http_429"} and statuses["ok"] >= 2 and statuses.get("http_429", 0) >= 1
    assert result["output_tokens"] == 6 * statuses["ok"]  # ignore_eos: every completion runs to its length
    latency = result["latency"]
    assert 0 < latency["ttft_s"]["p50"] <= latency["e2e_s"]["p50"] and latency["tpot_s"]["mean"] > 0
    assert "ttft" in loadtest.table(result)


def test_requests_to_a_server_that_goes_away_are_reported_not_dropped():
    cfg = loadtest.LoadConfig(url="http://127.0.0.1:9", requests=3, concurrency=2, model="m")  # no preflight
    result = asyncio.run(loadtest.run(cfg))
    assert result["statuses"] == {"error": 3} and result["output_token_throughput"] == 0


def test_a_dead_url_is_a_one_line_error_before_any_load():
    """`loadtest` against nothing exited 0 with a table of zeros (issue 12, item 11)."""
    import subprocess
    import sys

    from quantdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot reach http://127.0.0.1:9"):
        asyncio.run(loadtest.run(loadtest.LoadConfig(url="http://127.0.0.1:9", requests=3, concurrency=2)))
    proc = subprocess.run([sys.executable, "-m", "quantdeploy", "loadtest", "http://127.0.0.1:9", "--requests", "2"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is the server running?" in lines[0], proc.stderr
