"""The engine loop in a process of its own (what ``quantdeploy serve`` uses on a GPU), over a real socket:
the same answers as the engine in-process, and a dead engine process fails requests cleanly."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import httpx
import pytest

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.serve.app import ServeConfig
from quantdeploy.serve.engine_loop import EngineSpec
from tests.serve.test_server import serving

OPTIONS = {"max_batch": 4, "max_seq_len": 128}


@pytest.fixture(scope="module")
def process_server(tiny_llama_dir):
    spec = EngineSpec(str(tiny_llama_dir), "cpu", OPTIONS)
    with serving(spec, ServeConfig(model_name="tiny", max_queue=16, max_new_tokens=64)) as url:
        yield url


def _engine_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "quantdeploy-engine"]


def test_answers_equal_the_engine_run_directly(process_server, tiny_llama_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{process_server}/v1", api_key="none", max_retries=0)
    prompts = ["The history of", "In 1850 the city", "A"]
    engine = Engine.load(tiny_llama_dir, "cpu", **OPTIONS)
    expected = [c.text for c in engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))]
    for prompt, text in zip(prompts, expected):
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
        streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        assert full.choices[0].text == text == "".join(c.choices[0].text for c in streamed)
        assert full.usage.completion_tokens == 16
    metrics = httpx.get(f"{process_server}/metrics").text
    assert 'quantdeploy_requests_total{status="ok"} 6.0' in metrics
    assert "quantdeploy_time_to_first_token_seconds_count 6.0" in metrics


def test_a_dead_engine_process_fails_requests_and_health(tiny_llama_dir):
    spec = EngineSpec(str(tiny_llama_dir), "cpu", OPTIONS)
    before = {p.pid for p in _engine_processes()}
    with serving(spec, ServeConfig(model_name="tiny", max_new_tokens=100)) as url:
        (process,) = [p for p in _engine_processes() if p.pid not in before]
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "The", "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is generating
            os.kill(process.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
        assert any("engine process exited" in line for line in rest)
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").status_code != 503 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "engine process exited" in health.json()["error"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
