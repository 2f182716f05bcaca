"""Prefill padding for the CUDA-graph shapes, on the CPU: padding rows (on the scratch row) and padding
positions change nothing a sequence can see. The graphs themselves are checked in test_engine_gpu.py."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.engine.kv_cache import StaticKVCache
from quantdeploy.engine.loading import from_bundle
from quantdeploy.engine.prefill_graphs import batch_sizes, pack_rows, run_packed
from quantdeploy.models.bundle import ModelBundle, SourceInfo

ROWS, POSITIONS, VOCAB = 4, 48, 300


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    model = from_bundle(ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="memory", kind="memory"))).model
    a = model.args
    model.attach_cache(lambda i, att: StaticKVCache(ROWS + 1, a.n_kv_heads, POSITIONS, a.head_dim, torch.float32, "cpu"))
    return model


MODEL = _model()


def _caches():
    return [torch.cat([layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache]).clone() for layer in MODEL.layers]


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=ROWS), extra_rows=st.integers(0, 3),
       extra_positions=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_padded_prefill_equals_the_unpadded_one(lengths, extra_rows, extra_positions, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    rows = torch.randperm(ROWS, generator=g)[: len(prompts)].tolist()
    longest = max(lengths)
    with torch.no_grad():
        for layer in MODEL.layers:  # a recognisable cache: rows the prefill must not touch keep these values
            layer.attention.kv_cache.k_cache.normal_(generator=g)
            layer.attention.kv_cache.v_cache.normal_(generator=g)
        before = _caches()
        tight = run_packed(MODEL, pack_rows(prompts, rows, len(prompts), longest, ROWS))
        tight_caches = _caches()
        for layer, cache in zip(MODEL.layers, before):  # the same starting cache for the padded run
            half = cache.shape[0] // 2
            layer.attention.kv_cache.k_cache.copy_(cache[:half])
            layer.attention.kv_cache.v_cache.copy_(cache[half:])
        padded = run_packed(MODEL, pack_rows(prompts, rows, len(prompts) + extra_rows, longest + extra_positions, ROWS))
        padded_caches = _caches()
    assert padded.shape[0] == len(prompts) + extra_rows
    assert torch.allclose(padded[: len(prompts)], tight, atol=1e-5)
    for old, new_tight, new_padded in zip(before, tight_caches, padded_caches):
        half = old.shape[0] // 2
        for cache_half in (slice(0, half), slice(half, None)):
            o, t, p = old[cache_half], new_tight[cache_half], new_padded[cache_half]
            for row in range(ROWS):
                if row not in rows:  # rows outside the batch are untouched
                    assert torch.equal(p[row], o[row])
            for row, n in zip(rows, lengths):  # each prompt's positions hold the same keys and values
                assert torch.allclose(p[row, :, :n], t[row, :, :n], atol=1e-5)


def test_batch_sizes_are_powers_of_two_then_the_maximum():
    assert batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_sizes(1) == (1,)
