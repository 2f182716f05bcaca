"""Our CPU decode attention over the paged cache (``kernels/cpu_attention.cpp``): it equals the masked
attention over the contiguous rows (fp32 and bf16 caches, every head size it is built for, grouped
heads, lengths on and off block and 8-position edges, empty rows), reads nothing past a row's own
length, refuses what it cannot serve with one line, and in the engine gives the tokens of the eager
SDPA path, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.kv_cache import choose_decode_attention
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.kernels import cpu_native
from tests.kernels.test_triton_attention_gpu import _paged, _reference

pytestmark = pytest.mark.skipif(cpu_native.unavailable() is not None, reason=f"our CPU kernels: {cpu_native.unavailable()}")


def attention(q, k, v, table, lengths):  # noqa: ANN001, ANN201
    return torch.ops.quantdeploy_cpu.decode_attention(q, k, v, table, lengths)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), kv_heads=st.sampled_from([1, 2, 3]), rep=st.sampled_from([1, 3, 4]),
       dim=st.sampled_from(cpu_native.ATTENTION_HEAD_DIMS), positions=st.integers(1, 200),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_it_equals_the_masked_attention_over_contiguous_rows(rows, kv_heads, rep, dim, positions, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv_heads * rep, dim, generator=g).to(dtype)
    k, v = torch.randn(2, rows + 1, kv_heads, positions, dim, generator=g).to(dtype)
    lengths = torch.randint(0, positions + 1, (rows,), generator=g)
    lengths[0] = positions
    got = attention(q, *_paged(k, v, g), lengths)
    expected = _reference(q.float(), k.float(), v.float(), lengths, None, None)
    expected[lengths == 0] = 0  # a row without positions gives zeros
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_nothing_past_a_rows_own_length_is_read():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 64, generator=g)
    k, v, table = _paged(*torch.randn(2, 4, 3, 512, 64, generator=g), g)
    lengths = torch.tensor([5, 70, 130])
    before = attention(q, k, v, table, lengths)
    for row, n in enumerate(lengths.tolist()):  # the rest of each row's last block, its later blocks, the scratch
        last = table[row, (n - 1) // 64]
        k[last, :, n % 64 or 64:] = v[last, :, n % 64 or 64:] = float("nan")
        for block in table[row, (n - 1) // 64 + 1:].tolist() + table[3].tolist() + [0]:
            k[block] = v[block] = float("nan")
    assert torch.equal(attention(q, k, v, table, lengths), before)
    assert not before.isnan().any()


def test_what_it_cannot_serve_is_refused_in_one_line():
    g = torch.Generator().manual_seed(0)
    k, v, table = _paged(*torch.randn(2, 2, 1, 64, 64, generator=g), g)
    q, lengths = torch.randn(1, 2, 64), torch.tensor([10])
    with pytest.raises(RuntimeError, match="q and caches all fp32 or all bf16"):
        attention(q.bfloat16(), k, v, table, lengths)
    with pytest.raises(RuntimeError, match="int64 lengths"):
        attention(q, k, v, table, lengths.int())
    with pytest.raises(RuntimeError, match="length 65 past its blocks"):
        attention(q, k, v, table, torch.tensor([65]))
    k48, v48, table48 = _paged(*torch.randn(2, 2, 1, 64, 48, generator=g), g)
    with pytest.raises(RuntimeError, match="head_dim 48 is not 16, 32, 64, 128 or 256"):
        attention(torch.randn(1, 2, 48), k48, v48, table48, lengths)
    assert not cpu_native.attends(torch.float32, "int8", 64)  # quantized caches keep the other paths
    assert not cpu_native.attends(torch.float32, None, 48)
    assert cpu_native.attends(torch.bfloat16, None, 64)


def test_the_engine_chooses_it_and_gives_the_eager_sdpa_tokens(tiny_bundle):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(5, 90)), [9], list(range(20, 60))]
    expected = [c.token_ids for c in Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512,
                                                        decode_attention="sdpa").generate(prompts, params)]
    for compile in (False, True):
        engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=512, compile=compile)
        assert engine.model.layers[0].attention.kv_cache.native
        assert engine.model.layers[0].attention.decode_attention == "split_kv"
        assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    assert choose_decode_attention(None, torch.device("cpu"), False, 64, native_cpu=True) == "split_kv"
