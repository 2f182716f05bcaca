"""The split-KV decode attention kernel against the reference (``reduce_attention`` over the cache rows
read as the engine reads them) on CUDA: every compute dtype, int8 and FP8 cache codes, grouped heads
(1, 3, 4 and 8 query heads per KV head), a head size that is not a power of two, lengths from 1 to the
whole cache, one split and many; and the engine with it, compiled, against the masked attention it
replaces, at a short and a long cache."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.models.llama import reduce_attention
from quantdeploy.quant.kv_cache import dequantize_kv, quantize_kv
from tests.engine.test_engine_gpu import _bundle as engine_bundle
from tests.engine.test_engine_gpu import _run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _reference(q, k_cache, v_cache, lengths, k_scale, v_scale):  # noqa: ANN001, ANN202
    """The masked attention over a contiguous cache ``[rows, Hkv, S, D]``."""
    b, h, d = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    k, v = k_cache[:b], v_cache[:b]
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    rep = h // kv_heads
    mask = (torch.arange(s, device=q.device)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, rep, s)
    return reduce_attention(q.reshape(b, kv_heads, rep, d), k, v, mask).reshape(b, h, d)


def _paged(k, v, g):  # noqa: ANN001, ANN202
    """The contiguous caches ``[rows, Hkv, S, D]`` cut into blocks scattered over a pool (block 0 unused, as
    the scratch block is) and the block table that finds them."""
    from quantdeploy.engine.kv_cache import BLOCK_TOKENS, blocks_for

    rows, heads, s, dim = k.shape
    nb = blocks_for(s)
    order = torch.randperm(rows * nb, device=k.device, generator=g) + 1
    table = order.view(rows, nb).to(torch.int32)
    pools = []
    for x in (k, v):
        padded = torch.zeros(rows, heads, nb * BLOCK_TOKENS, dim, dtype=x.dtype, device=x.device)
        padded[:, :, :s] = x
        pool = torch.zeros(1 + rows * nb, heads, BLOCK_TOKENS, dim, dtype=x.dtype, device=x.device)
        pool[order] = padded.view(rows, heads, nb, BLOCK_TOKENS, dim).transpose(1, 2).reshape(rows * nb, heads,
                                                                                             BLOCK_TOKENS, dim)
        pools.append(pool)
    return pools[0], pools[1], table


def _case(batch, heads, kv_heads, dim, positions, kv, g):  # noqa: ANN001, ANN202
    """Random q and contiguous caches of ``batch + 1`` rows (codes with per-head scales when ``kv``), and
    lengths from 1 to the whole cache (the last row's), on ``g``'s device."""
    device = g.device
    q = torch.randn(batch, heads, dim, device=device, generator=g)
    k = torch.randn(batch + 1, kv_heads, positions, dim, device=device, generator=g)
    v = torch.randn_like(k)
    scale = None
    if kv:
        scale = torch.rand(kv_heads, device=device, generator=g) * 0.02 + 0.01
        k, v = quantize_kv(k, scale, kv), quantize_kv(v, scale, kv)
    lengths = torch.randint(1, positions + 1, (batch,), device=device, generator=g)
    lengths[-1] = positions
    return q, k, v, scale, lengths


CASES = [  # batch, heads, kv heads, head dim, cache positions
    (1, 32, 8, 128, 8192),  # the 8B shape at batch 1: many splits
    (64, 32, 8, 128, 512),  # the 8B shape at batch 64: one split
    (5, 9, 3, 64, 700),  # SmolLM2's grouping, lengths not a multiple of a tile
    (3, 8, 8, 80, 300),  # no grouping; a head size that is not a power of two
    (2, 16, 2, 64, 4096),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kv", [None, "int8", "fp8_e4m3"])
def test_kernel_matches_the_reference(case, kv):
    from quantdeploy.kernels.triton_attention import decode_attention

    batch, heads, kv_heads, dim, positions = case
    g = torch.Generator(device="cuda").manual_seed(batch * positions)
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)):
        q = torch.randn(batch, heads, 2 * dim, device="cuda", generator=g).to(dtype)[..., ::2]  # non-contiguous
        k = torch.randn(batch + 1, kv_heads, positions, dim, device="cuda", generator=g).to(dtype)
        v = torch.randn(batch + 1, kv_heads, positions, dim, device="cuda", generator=g).to(dtype)
        k_scale = v_scale = None
        if kv is not None:
            k_scale = torch.rand(kv_heads, device="cuda", generator=g) * 0.02 + 0.01
            v_scale = torch.rand(kv_heads, device="cuda", generator=g) * 0.02 + 0.01
            k, v = quantize_kv(k, k_scale, kv), quantize_kv(v, v_scale, kv)
        lengths = torch.randint(1, positions + 1, (batch,), device="cuda", generator=g)
        lengths[0] = 1
        lengths[-1] = positions
        expected = _reference(q.float(), k if kv else k.float(), v if kv else v.float(), lengths, k_scale, v_scale)
        got = decode_attention(q, *_paged(k, v, g), lengths, k_scale, v_scale)
        assert got.dtype == dtype and got.shape == q.shape
        error = ((got.float() - expected).norm() / expected.norm()).item()
        assert error < tolerance, (dtype, error)


@pytest.mark.parametrize("splits", [3, 5, 48])
def test_any_split_count_gives_the_one_split_output(splits):
    """The combine kernel pads a split count that is not a power of two (masked slices weigh nothing)."""
    from quantdeploy.kernels.triton_attention import decode_attention_impl

    g = torch.Generator(device="cuda").manual_seed(splits)
    q = torch.randn(3, 32, 128, device="cuda", generator=g)
    k, v = torch.randn(2, 4, 8, 8192, 128, device="cuda", generator=g)
    k, v, table = _paged(k, v, g)
    lengths = torch.tensor([1, 3000, 8192], device="cuda")
    one = decode_attention_impl(q, k, v, table, lengths, None, None, splits=1)
    torch.testing.assert_close(decode_attention_impl(q, k, v, table, lengths, None, None, splits=splits), one,
                               rtol=1e-5, atol=1e-5)


def test_positions_past_a_rows_length_are_never_read():
    from quantdeploy.kernels.triton_attention import decode_attention

    q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v, table = _paged(*torch.randn(2, 5, 2, 2048, 64, device="cuda", dtype=torch.bfloat16),
                         torch.Generator(device="cuda").manual_seed(1))
    lengths = torch.tensor([1, 100, 777, 2048], device="cuda")
    before = decode_attention(q, k, v, table, lengths, None, None)
    for row, n in enumerate(lengths.tolist()):  # what lies past the length (stale or poisoned) must not matter
        for position in range(n, 2048):
            block, offset = table[row, position // 64], position % 64
            k[block, :, offset] = float("nan")
            v[block, :, offset] = float("nan")
    k[0] = v[0] = float("nan")  # nor the scratch block, nor blocks of rows past the batch
    k[table[4]] = v[table[4]] = float("nan")
    after = decode_attention(q, k, v, table, lengths, None, None)
    assert torch.equal(before, after)


def test_splits_cover_the_card_only_when_the_batch_does_not():
    from quantdeploy.kernels.triton_attention import MAX_SPLITS, splits_for

    assert splits_for(64, 8, 32768, 132) == 1  # 512 programs already
    assert splits_for(1, 8, 32768, 132) == 32  # 256 programs: one wave of 3 per SM (396), 512 would not be
    assert splits_for(1, 8, 256, 132) == 1  # a full row is one split of four tiles
    assert splits_for(16, 8, 8192, 132) == 2
    assert splits_for(4, 8, 8192, 132) == 8
    assert splits_for(1, 2, 1 << 20, 132) == MAX_SPLITS


def _bundle(dtype):
    return engine_bundle(dtype, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         max_position_embeddings=8192)


def test_engine_tokens_with_split_kv_equal_the_masked_attention_at_any_cache_length():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 300, 1, 1200, 77)]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    bundle = _bundle(torch.float32)
    runs = {}
    for attention, seq_len in (("sdpa", 1300), ("split_kv", 1300), ("split_kv", 8192)):
        engine = Engine.from_bundle(bundle, "cuda", max_batch=8, max_seq_len=seq_len, compile=attention == "split_kv",
                                    decode_attention=attention)
        assert engine.model.layers[0].attention.decode_attention == attention
        runs[attention, seq_len] = _run(engine, params, prompts)
    assert runs["split_kv", 1300] == runs["sdpa", 1300]
    assert runs["split_kv", 8192] == runs["sdpa", 1300]


def test_engine_default_on_cuda_is_split_kv_and_bf16_logits_match_the_masked_path():
    bundle = _bundle(torch.bfloat16)
    logits = []
    for attention in (None, "reduce"):
        engine = Engine.from_bundle(bundle, "cuda", max_batch=4, max_seq_len=2048, decode_attention=attention)
        assert engine.model.layers[0].attention.decode_attention == (attention or "split_kv")
        for n in (3, 600, 40, 1):
            engine.add([1 + i % 500 for i in range(n)], SamplingParams(max_tokens=8, ignore_eos=True))
        engine._prefill_added()
        logits.append(engine._run_decode(4, engine.max_seq_len).float().clone())
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 2e-2


def test_engine_with_a_pool_too_small_for_its_rows_preempts_and_gives_the_same_tokens():
    """Compiled decode over the paged cache with sequences preempted and recomputed mid-generation: the
    tokens equal those of an engine whose pool holds every row at full length."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 300, 1, 200, 77, 130)]
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    bundle = _bundle(torch.float32)
    roomy = Engine.from_bundle(bundle, "cuda", max_batch=4, max_seq_len=1024)
    tight = Engine.from_bundle(bundle, "cuda", max_batch=4, max_seq_len=1024, kv_cache_tokens=20 * 64)
    assert [c.token_ids for c in tight.generate(prompts, params)] == [c.token_ids for c in roomy.generate(prompts, params)]
    assert tight.counters.preemptions > 0 and roomy.counters.preemptions == 0

