"""The paged KV cache: the block table's bookkeeping, reads and writes through a scattered table equal a
contiguous cache, and the engine's admission and preemption rules (``engine/kv_cache.py``) leaving every
sequence's tokens as they are with memory to spare."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantdeploy as qd
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.kv_cache import BLOCK_TOKENS, SCRATCH, BlockTable, PagedKVCache, blocks_for
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import ConfigError

PROMPTS = ["The history of", "In 1850 the city", "A", "Mathematics is the study of numbers and", "Once upon a time"]


def test_the_table_gives_and_takes_back_blocks():
    table = BlockTable(rows=3, max_seq_len=200, n_blocks=9, device="cpu")  # 8 usable blocks, 4 per full row
    assert table.free_blocks == 8 and table.host.shape == (3, 4)
    assert table.grow(0, 1) and table.grow(0, BLOCK_TOKENS) and table.owned[0] == [1]
    assert table.grow(1, BLOCK_TOKENS + 1) and table.owned[1] == [2, 3]
    assert not table.grow(2, 6 * BLOCK_TOKENS)  # 6 blocks asked, 5 free: nothing taken
    assert table.free_blocks == 5 and table.owned[2] == []
    table.sync()
    assert table.tensor[1, :2].tolist() == [2, 3] and table.tensor[1, 2:].tolist() == [SCRATCH, SCRATCH]
    assert table.release(1) == [2, 3] and table.free_blocks == 7
    table.sync()
    assert table.tensor[1].tolist() == [SCRATCH] * 4
    assert table.grow(2, 2 * BLOCK_TOKENS) and table.owned[2] == [2, 3]  # freed blocks are reused
    assert table.used_blocks == 3


def test_a_pool_smaller_than_one_sequence_is_refused():
    with pytest.raises(ConfigError, match="cannot hold one sequence of max_seq_len 256"):
        BlockTable(rows=2, max_seq_len=256, n_blocks=4, device="cpu")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 3 * BLOCK_TOKENS), min_size=1, max_size=4),
       quant=st.sampled_from([None, "int8", "fp8_e4m3"]))
def test_writes_and_reads_through_scattered_blocks_equal_a_contiguous_cache(seed, lengths, quant):
    g = torch.Generator().manual_seed(seed)
    rows, heads, dim, max_len = len(lengths), 2, 8, 3 * BLOCK_TOKENS
    table = BlockTable(rows, max_len, 1 + 3 * rows + 2, "cpu")
    order = torch.randperm(rows, generator=g).tolist()
    for row in order:  # rows take their blocks in a scrambled order, in two growth steps each
        assert table.grow(row, lengths[row] // 2 + 1) and table.grow(row, lengths[row])
    table.sync()
    scale = torch.rand(heads, generator=g) * 0.05 + 0.01
    cache = PagedKVCache(table, heads, dim, torch.float32, "cpu", quant, scale, scale)
    longest = max(lengths)
    k = torch.randn(rows, heads, longest, dim, generator=g)
    v = torch.randn(rows, heads, longest, dim, generator=g)
    positions = torch.arange(longest).expand(rows, longest)
    cache.write(torch.arange(rows), positions, k, v)
    got_k, got_v = cache.read(slice(0, rows), longest, torch.float32)
    for row, n in enumerate(lengths):
        for got, want in ((got_k, k), (got_v, v)):
            if quant:
                want = qd.quant.kv_cache.fake_quantize_kv(want, scale, quant)
            assert torch.equal(got[row, :, :n], want[row, :, :n])
    index = torch.tensor([order[0]])  # a gathered read of one row equals the slice read
    assert torch.equal(cache.read(index, longest, torch.float32)[0], got_k[order[0]:order[0] + 1])


@pytest.fixture(scope="module")
def roomy(tiny_bundle):
    return Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=192)


def _params(**kw):
    return SamplingParams(max_tokens=150, ignore_eos=True, **kw)


@pytest.mark.parametrize("params", [_params(), _params(temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.2)],
                         ids=["greedy", "sampled"])
def test_preempted_sequences_give_the_tokens_they_would_have(tiny_bundle, roomy, params):
    """Four sequences growing to ~155 positions (3 blocks each) in a pool of 6 blocks: three are admitted,
    the newest is preempted when the older two need its blocks and is recomputed after them; every
    sequence's tokens (sampled ones too: same seed, same step count) equal those with room to spare."""
    expected = [c.token_ids for c in roomy.generate(PROMPTS[:4], params)]
    tight = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=192, kv_cache_tokens=6 * BLOCK_TOKENS)
    assert [c.token_ids for c in tight.generate(PROMPTS[:4], params)] == expected
    assert tight.counters.preemptions > 0
    assert tight.table.used_blocks == 0 and not tight.running


def test_admission_waits_for_blocks_not_for_rows(tiny_bundle):
    """Rows are free but the pool is not: ``can_admit`` says no, ``add`` refuses, and the prompt is
    admitted once a sequence ends and gives its blocks back."""
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=192, kv_cache_tokens=4 * BLOCK_TOKENS)
    prompt = list(range(5, 105))  # 100 tokens: 2 blocks with its first decode position
    first = engine.add(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.free_rows == 3 and not engine.can_admit(len(prompt))  # 2 free blocks, 2 needed + 1 spare
    with pytest.raises(RuntimeError, match="can_admit"):
        engine.add(prompt, SamplingParams(max_tokens=4))
    assert engine.can_admit(3)  # a short prompt still fits
    while not first.finished:
        engine.step()
    assert engine.can_admit(len(prompt)) and engine.table.free_blocks == 4


def test_a_long_context_costs_memory_only_when_used(tiny_bundle):
    """max_seq_len of 512 and room for 640 positions in all (8 static rows would take 4,096): five short
    sequences run at once, a block each."""
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=8, max_seq_len=512, kv_cache_tokens=640)
    assert engine.max_seq_len == 512 and engine.table.n_blocks == blocks_for(640) + 1  # scratch + 10 blocks
    seqs = [engine.add(engine.encode(p), SamplingParams(max_tokens=8, ignore_eos=True)) for p in PROMPTS]
    engine.step()
    assert len(engine.running) == 5 and engine.table.used_blocks == 5
    while engine.running:
        engine.step()
    assert all(len(s.output_ids) == 8 for s in seqs)


def test_preemption_with_an_int8_kv_cache(tiny_bundle, train_text, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(train_text[:50_000])
    kv = qd.KVCacheConfig(dtype="int8", calibration=qd.CalibrationConfig(str(calib), 4, 64))
    bundle = qd.quantize(tiny_bundle, qd.RTNConfig(bits=8), kv_cache=kv)
    params = _params()
    roomy = Engine.from_bundle(bundle, "cpu", max_batch=4, max_seq_len=192)
    tight = Engine.from_bundle(bundle, "cpu", max_batch=4, max_seq_len=192, kv_cache_tokens=6 * BLOCK_TOKENS)
    assert tight.model.layers[0].attention.kv_cache.k_cache.dtype == torch.int8
    assert [c.token_ids for c in tight.generate(PROMPTS[:4], params)] == \
        [c.token_ids for c in roomy.generate(PROMPTS[:4], params)]
    assert tight.counters.preemptions > 0


def test_an_aborted_preempted_sequence_leaves_nothing_behind(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=2, max_seq_len=192, kv_cache_tokens=4 * BLOCK_TOKENS)
    seqs = [engine.add(engine.encode(p), _params()) for p in PROMPTS[:2]]
    while not engine.slots.preempted:
        engine.step()
    victim = engine.slots.preempted[0]
    assert victim is seqs[1]  # the newer one
    engine.abort(victim)
    assert victim not in engine.running and victim.finish_reason == "abort"
    while engine.running:
        engine.step()
    assert len(seqs[0].output_ids) == 150 and engine.table.used_blocks == 0


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40, ignore_eos=True),
                                    SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.9, seed=3,
                                                   repetition_penalty=1.3)], ids=["greedy", "sampled"])
def test_a_long_prompt_prefilled_in_chunks_lets_the_other_rows_decode(tiny_bundle, params):
    """A 300-token prompt joins two decoding rows: in chunks of 64 it takes five steps to its first token
    (one step whole),
    and each of those steps gives the short sequences a token; every sequence's tokens equal those of
    whole prefills."""
    long_prompt = [5 + (7 * i) % 300 for i in range(300)]
    whole = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512, prefill_chunk_tokens=None)
    chunked = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512, prefill_chunk_tokens=64)
    results = []
    for engine in (whole, chunked):
        short = [engine.add(engine.encode(p), params) for p in PROMPTS[:2]]
        engine.step()
        engine.step()
        long = engine.add(long_prompt, params)
        received = []
        while not long.output_ids:
            before = [len(s.output_ids) for s in short]
            engine.step()
            received.append([len(s.output_ids) - b for s, b in zip(short, before)])
        while engine.running:
            engine.step()
        results.append(([s.output_ids for s in short], long.output_ids, received))
    assert results[1][:2] == results[0][:2]
    assert len(results[0][2]) == 1 and len(results[1][2]) == 5  # whole: one step; chunked: 5 chunks, a step each
    assert all(r == [1, 1] for r in results[1][2])  # the short rows got a token at every one of those steps
    assert chunked.counters.prefill_sequences == whole.counters.prefill_sequences == 3


def test_aborting_a_prompt_mid_chunks_frees_its_row_and_blocks(tiny_bundle):
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=2, max_seq_len=512, prefill_chunk_tokens=64)
    long = engine.add(list(range(5, 305)), _params())
    engine.step()
    engine.step()
    assert long.prefilled == 128 and not long.output_ids
    engine.abort(long)
    assert not engine.running and engine.free_rows == 2 and engine.table.used_blocks == 0
    again = engine.generate(list(range(5, 305)), SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(again.token_ids) == 4
