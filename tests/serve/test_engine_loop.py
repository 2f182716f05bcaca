"""The engine loop without HTTP: scripted commands in, event batches out (tiny model, CPU)."""

from __future__ import annotations

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.serve.engine_loop import EngineLoop

LONG = SamplingParams(max_tokens=30, ignore_eos=True)


def _drive(engine: Engine, script: list[list[tuple]], wait_steps: int) -> tuple[EngineLoop, list[tuple[int, list]]]:
    """Run the loop over ``script`` (the commands each receive returns, then stop); record each batch with
    the number of steps run when it was sent (a request admitted before step k is reported after it)."""
    sent: list[tuple[int, list]] = []
    loop = None

    def receive(_timeout: float) -> list:
        return script.pop(0) if script else [("stop",)]

    loop = EngineLoop(engine, lambda batch: sent.append((loop.steps, batch)), prefill_wait_steps=wait_steps)
    loop.run(receive)
    return loop, sent


def _admitted_at(sent: list[tuple[int, list]]) -> dict[str, int]:
    return {e[1]: step for step, batch in sent for e in batch if e[0] == "admitted"}


def test_arrivals_while_rows_decode_are_gathered_into_one_prefill(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=128)
    ids = engine.encode("The history of")
    script = [[("submit", "a", ids, LONG)], [("submit", "b", ids, LONG)], [], [("submit", "c", ids, LONG)], [], [], []]
    _, sent = _drive(engine, script, wait_steps=3)
    admitted = _admitted_at(sent)
    assert admitted["a"] == 1  # an idle engine admits at once
    assert admitted["b"] == admitted["c"] == 5  # b (arrived after step 1) waited 3 steps; c came along
    assert engine.counters.prefill_batches == 2 and engine.counters.prefill_sequences == 3


def test_arrivals_that_fill_every_free_row_go_at_once_and_zero_wait_admits_each(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=3, max_seq_len=128)
    ids = engine.encode("In 1850")
    script = [[("submit", "a", ids, LONG)], [("submit", "b", ids, LONG), ("submit", "c", ids, LONG)], [], []]
    _, sent = _drive(engine, script, wait_steps=10)
    assert _admitted_at(sent) == {"a": 1, "b": 2, "c": 2}
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=3, max_seq_len=128)
    script = [[("submit", "a", ids, LONG)], [("submit", "b", ids, LONG)], [("submit", "c", ids, LONG)], []]
    _, sent = _drive(engine, script, wait_steps=0)
    assert _admitted_at(sent) == {"a": 1, "b": 2, "c": 3} and engine.counters.prefill_batches == 3


def test_stop_cancels_what_is_left_and_every_request_gets_one_answer(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=1, max_seq_len=128)
    ids = engine.encode("A")
    script = [[("submit", "a", ids, LONG), ("submit", "b", ids, LONG)], [], [("cancel", "a")], [("submit", "c", ids, LONG)]]
    _, sent = _drive(engine, script, wait_steps=0)
    final = [(e[0], e[1], e[2]) for _, batch in sent for e in batch if e[0] in ("done", "error")]
    assert sorted(final) == [("done", "a", "abort"), ("done", "b", "abort"), ("done", "c", "abort")]
    assert sent[-1][1] == [("stopped",)] and engine.free_rows == 1
    deltas = [e for _, batch in sent for e in batch if e[0] == "delta" and e[1] == "a"]
    assert deltas and all(e[3] >= 1 for e in deltas)


def test_requests_wait_for_kv_blocks_and_preempted_ones_finish_whole(tiny_bundle):
    """A pool of 6 blocks for 4 rows: the loop admits what the blocks allow (not what the rows do), the
    newest running request is preempted and recomputed, and every request streams all its tokens once."""
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=192, kv_cache_tokens=6 * 64)
    ids = engine.encode("The history of")
    script = [[("submit", rid, ids, params) for rid in "abcd"]] + [[] for _ in range(400)]
    loop, sent = _drive(engine, script, wait_steps=0)
    admitted = _admitted_at(sent)
    assert admitted["a"] == admitted["b"] == admitted["c"] == 1 and admitted["d"] > 1  # 3 fit at first
    streamed = {rid: sum(e[3] for _, batch in sent for e in batch if e[0] == "delta" and e[1] == rid) for rid in "abcd"}
    done = {e[1]: (e[2], e[4]) for _, batch in sent for e in batch if e[0] == "done"}
    assert streamed == dict.fromkeys("abcd", 150) and done == dict.fromkeys("abcd", ("length", 150))
    stats = [e for _, batch in sent for e in batch if e[0] == "stats"]
    assert sum(e[4].get("preemptions", 0) for e in stats) == engine.counters.preemptions > 0
    turns = [t for e in stats for t in e[5]]  # every loop turn that ran a step is timed once
    assert len(turns) == loop.steps and all(t > 0 for t in turns)
    assert max(e[2] for e in stats) == 1.0 and engine.kv_usage == 0.0
