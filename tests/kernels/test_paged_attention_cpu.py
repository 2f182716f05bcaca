"""The CPU decode-attention op over the paged cache: it equals the masked attention over the contiguous
rows, never reads past the longest row, and a row in a bucket of its own reads only its own blocks (what
lies past them may be anything); in the engine, eager and traced by dynamo as a compiled step traces it,
it gives the tokens of the eager SDPA path."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.kernels.paged_attention_cpu import decode_attention_cpu
from tests.kernels.test_triton_attention_gpu import _case, _paged, _reference


@pytest.mark.parametrize("kv", [None, "int8", "fp8_e4m3"])
@pytest.mark.parametrize("case", [(3, 8, 2, 32, 200), (1, 4, 4, 16, 64), (5, 9, 3, 8, 130)], ids=str)
def test_the_op_equals_the_masked_attention_over_contiguous_rows(case, kv):
    g = torch.Generator().manual_seed(case[0] * case[-1])
    q, k, v, scale, lengths = _case(*case, kv, g)
    got = decode_attention_cpu(q, *_paged(k, v, g), lengths, scale, scale)
    expected = _reference(q, k, v, lengths, scale, scale)
    assert torch.allclose(got, expected, atol=1e-5)


def test_positions_past_the_longest_row_are_never_read():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g)
    k, v, table = _paged(*torch.randn(2, 4, 2, 512, 16, generator=g), g)
    lengths = torch.tensor([5, 70, 130])
    before = decode_attention_cpu(q, k, v, table, lengths, None, None)
    for row in range(3):  # blocks past the longest row's (130 positions: three blocks), and the scratch block
        for block in table[row, 3:].tolist() + table[3].tolist() + [0]:
            k[block] = v[block] = float("nan")
    assert torch.equal(decode_attention_cpu(q, k, v, table, lengths, None, None), before)


def test_a_short_row_beside_a_long_one_reads_only_its_own_blocks():
    """Rows of 1, 2, 3 and 8 blocks (64 positions a block) fall in buckets 1, 2, 4, 8: each bucket's
    longest row is its only one, so every row reads exactly its own blocks."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 4, 16, generator=g)
    k, v, table = _paged(*torch.randn(2, 4, 2, 512, 16, generator=g), g)
    lengths = torch.tensor([5, 100, 150, 500])
    before = decode_attention_cpu(q, k, v, table, lengths, None, None)
    held = {0: 1, 1: 2, 2: 3, 3: 8}
    for row, blocks in held.items():
        for block in table[row, blocks:].tolist():
            if block not in {b for r, n in held.items() for b in table[r, :n].tolist()}:
                k[block] = v[block] = float("nan")
    assert torch.equal(decode_attention_cpu(q, k, v, table, lengths, None, None), before)
    assert not before.isnan().any()


def test_the_engine_with_the_op_gives_the_eager_tokens_traced_or_not(tiny_bundle):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(5, 90)), [9], list(range(20, 60))]
    expected = [c.token_ids for c in Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512)
                .generate(prompts, params)]
    for traced in (False, True):
        engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512, decode_attention="split_kv")
        for layer in engine.model.layers:  # this op, not our C++ kernel (it serves quantized caches, or no build)
            layer.attention.kv_cache.native = False
        if traced:  # dynamo's graph with the op kept whole, as a compiled step has it (inductor's code aside)
            engine.compiled = True
            engine._decode = torch.compile(engine.model.decode, fullgraph=True, dynamic=False, backend="eager")
        assert [c.token_ids for c in engine.generate(prompts, params)] == expected
