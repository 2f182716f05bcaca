"""The decode benchmark times decode steps only: prompts longer than a prefill chunk are prefilled a
chunk per step, and all of that (with any compile it triggers) happens before the clock starts."""

from __future__ import annotations

from quantdeploy.bench import decode
from quantdeploy.bench.decode import BenchConfig, decode_rate
from quantdeploy.engine.engine import Engine


def test_no_prefill_chunk_runs_in_the_timed_steps(tiny_bundle, monkeypatch):
    cfg = BenchConfig(prompt_len=64, steps=8, warmup=2, max_seq_len=64 + 2 + 8 + 8)  # as tight as it allows
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=cfg.seq_len(), prefill_chunk_tokens=16)
    chunks, at_start = [], []
    prefill_chunk = engine._prefill_chunk

    def counted(seq):  # noqa: ANN001, ANN202
        chunks.append(seq.id)
        return prefill_chunk(seq)

    monkeypatch.setattr(engine, "_prefill_chunk", counted)
    sync = decode._sync
    monkeypatch.setattr(decode, "_sync", lambda device: (at_start.append(len(chunks)), sync(device)))
    tok_s, step_s, held, _ = decode_rate(engine, 3, cfg)
    assert tok_s > 0 and step_s > 0
    assert len(chunks) >= 3 + 4  # prompts of 32, 48 and 64 tokens, chunks of 16 (the first 2 of the 32-token one)
    assert at_start[0] == len(chunks)  # the clock starts (first sync) after the last chunk
    # rows joined at different steps: the positions held are the rows' own, not prompt + warmup for all
    assert held > (32 + 48 + 64) + 3 * (cfg.warmup + 1 + (cfg.steps - 1) / 2)
