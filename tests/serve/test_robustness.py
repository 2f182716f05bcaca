"""The server stays healthy: fuzzed bodies never get a 5xx, a request whose numbers go bad fails alone,
and draining finishes or cancels in-flight requests."""

from __future__ import annotations

import asyncio
import copy

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.serve.app import ServeConfig
from quantdeploy.serve.engine_loop import EngineThread
from quantdeploy.serve.metrics import Metrics
from quantdeploy.serve.scheduler import Scheduler
from tests.serve.test_server import serving

FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed",
          "n", "repetition_penalty", "echo", "logprobs", "max_completion_tokens", "max_length", "user"]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "type", "text"]),
                                                                        children, max_size=3),
    max_leaves=6)
BODIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)


@pytest.fixture(scope="module")
def fuzz_server(tiny_bundle):
    config = ServeConfig(model_name="tiny", max_queue=64, max_new_tokens=16)
    with serving(lambda: Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=128), config) as url:
        yield url


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"]), body=BODIES,
       raw=st.booleans())
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, path, body, raw):
    if raw:  # not even JSON
        r = httpx.post(fuzz_server + path, content=repr(body).encode(), headers={"content-type": "application/json"})
    else:
        r = httpx.post(fuzz_server + path, json=body, timeout=60) if _jsonable(body) else None
    if r is not None:
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()
    assert httpx.get(fuzz_server + "/health").status_code == 200


def _jsonable(body) -> bool:
    import json
    import math

    def finite(v):  # JSON has no NaN/inf; httpx refuses to send them
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(finite(x) for x in v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        return True

    try:
        json.dumps(body)
    except (TypeError, ValueError):
        return False
    return finite(body)


def test_a_request_with_non_finite_logits_fails_alone(tiny_bundle):
    bundle = copy.deepcopy(tiny_bundle)
    poison = bundle.tokenizer("zebra").input_ids[-1]
    with torch.no_grad():
        bundle.model.model.embed_tokens.weight[poison] = float("nan")
    engine = Engine.from_bundle(bundle, "cpu", max_batch=2, max_seq_len=64)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    clean_alone = engine.generate("The history of", params).token_ids
    bad = engine.add(bundle.tokenizer("zebra").input_ids, params)
    good = engine.add(bundle.tokenizer("The history of").input_ids, params)
    while engine.running:
        engine.step()
    assert bad.finish_reason == "error" and good.output_ids == clean_alone
    # the poisoned row was wiped: the next sequence there decodes as if nothing happened
    assert engine.generate("The history of", params).token_ids == clean_alone


def test_drain_finishes_in_flight_requests_or_cancels_them_at_the_deadline(tiny_bundle):
    async def scenario(deadline: float) -> list[str]:
        engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=2, max_seq_len=128)
        scheduler = Scheduler(max_queue=8, metrics=Metrics())
        scheduler.attach(EngineThread(engine, scheduler.deliver_threadsafe))
        jobs = [scheduler.submit(engine.encode(p), SamplingParams(max_tokens=40, ignore_eos=True))
                for p in ("The history of", "In 1850", "A")]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(scheduler.drain, deadline)
        reasons = []
        for job in jobs:
            while True:
                event = await asyncio.wait_for(job.events.get(), 5)
                if event["kind"] == "done":
                    reasons.append(event["finish_reason"])
                    break
        return reasons

    assert asyncio.run(scenario(60.0)) == ["length"] * 3
    assert "abort" in asyncio.run(scenario(0.0))
