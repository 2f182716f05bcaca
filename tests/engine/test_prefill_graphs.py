"""Prefill CUDA graphs, what the CPU can check: padding rows (on the scratch row) and padding positions
change nothing a sequence can see, chunks at static shapes equal a whole prefill, and no quantized
prefill moves data from the host (a capture would refuse it). The graphs themselves are checked in test_engine_gpu.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from quantdeploy.engine.kv_cache import BlockTable, PagedKVCache
from quantdeploy.engine.loading import from_bundle
from quantdeploy.engine.prefill_graphs import (CHUNK_GRAPH_POSITIONS, batch_sizes, chunk_lengths, pack_chunk, pack_rows,
                                                run_chunk, run_packed)
from quantdeploy.models.bundle import ModelBundle, SourceInfo

ROWS, POSITIONS, VOCAB = 4, 48, 300


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    model = from_bundle(ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="memory", kind="memory"))).model
    a = model.args
    table = BlockTable.contiguous(ROWS + 1, POSITIONS, "cpu")  # one block per row (POSITIONS <= 64)
    model.attach_cache(lambda i, att: PagedKVCache(table, a.n_kv_heads, a.head_dim, torch.float32, "cpu"))
    return model


MODEL = _model()


def _caches():
    """Per layer, keys then values ``[2 * rows, Hkv, 64, D]``: row ``r``'s block is ``r + 1`` (0 is scratch)."""
    return [torch.cat([layer.attention.kv_cache.k_cache[1:], layer.attention.kv_cache.v_cache[1:]]).clone()
            for layer in MODEL.layers]


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
            layer.attention.kv_cache.k_cache[1:].copy_(cache[:half])
            layer.attention.kv_cache.v_cache[1:].copy_(cache[half:])
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


@settings(max_examples=20, deadline=None)
@given(length=st.integers(2, POSITIONS), chunk=st.sampled_from([8, 16, 24]), seed=st.integers(0, 2**16))
def test_chunks_at_static_shapes_equal_the_whole_prompt(length, chunk, seed):
    """A prompt in chunks of a graph's static shape (offset read from the input, the last chunk padded,
    each attending over exactly the positions up to its end) leaves the keys and values and the last
    logits of one whole prefill."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (length,), generator=g).tolist()
    row = int(torch.randint(0, ROWS, (1,), generator=g))
    with torch.no_grad():
        whole = run_packed(MODEL, pack_rows([prompt], [row], 1, length, ROWS))
        whole_caches = _caches()
        for layer in MODEL.layers:  # what the chunks must overwrite
            layer.attention.kv_cache.k_cache.normal_(generator=g)
            layer.attention.kv_cache.v_cache.normal_(generator=g)
        for start in range(0, length, chunk):
            logits = run_chunk(MODEL, pack_chunk(prompt, row, start, chunk), start + chunk)
        chunked_caches = _caches()
    assert torch.allclose(logits, whole, atol=1e-5)
    for w, c in zip(whole_caches, chunked_caches):
        half = w.shape[0] // 2
        for part in (slice(0, half), slice(half, None)):
            assert torch.allclose(c[part][row, :, :length], w[part][row, :, :length], atol=1e-5)


def test_chunk_graphs_cover_the_lengths_a_chunk_can_end_at():
    """Chunk k of a prompt ends at position (k+1)C - 1: one graph per multiple of C the block table reaches,
    up to CHUNK_GRAPH_POSITIONS, none when max_seq_len leaves no prompt to chunk."""
    assert chunk_lengths(16, 48, 64) == [16, 32, 48, 64]
    assert chunk_lengths(2048, 8448, 8448) == [2048, 4096, 6144, 8192]
    assert chunk_lengths(2048, 131072, 131072) == [2048 * k for k in range(1, CHUNK_GRAPH_POSITIONS // 2048 + 1)]
    assert chunk_lengths(2048, 2048, 2048) == [] and chunk_lengths(None, 512, 512) == []


def test_batch_sizes_are_powers_of_two_then_the_maximum():
    assert batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_sizes(1) == (1,)


class _HostTransfers(TorchDispatchMode):
    """Records every op that takes a host tensor and gives a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in ins) and any(t.device.type != "cpu" for t in outs):
            self.seen.append(str(func))
        return out


QUANTIZED = {
    "int4-sym": lambda qd: qd.RTNConfig(bits=4, group_size=32),
    "int8-asym": lambda qd: qd.RTNConfig(bits=8, symmetric=False),
    "nf4-double-quant": lambda qd: qd.NF4Config(group_size=32),
    "fp8": lambda qd: qd.FP8Config(),
    "w8a8-int8": None,  # calibrated: built in the test
}


@pytest.mark.parametrize("method", list(QUANTIZED))
def test_a_quantized_prefill_moves_nothing_from_the_host(tiny_bundle, train_text, tmp_path, method, monkeypatch):
    """What a CUDA graph cannot capture: a host-to-device copy (or a sync) inside the prefill forward. The
    model runs on the meta device, so any host tensor that reaches it is a transfer; the reference kernels
    are the path the GPU takes for quantized weights."""
    import quantdeploy as qd
    from quantdeploy.engine.engine import Engine

    calib = tmp_path / "calib.txt"
    calib.write_text(train_text[:50_000])
    calibration = qd.CalibrationConfig(str(calib), 4, 64)
    config = QUANTIZED[method](qd) if QUANTIZED[method] else qd.SmoothQuantConfig(alpha=0.5, calibration=calibration)
    kv = qd.KVCacheConfig(dtype="int8", calibration=calibration) if method == "int4-sym" else None
    engine = Engine.from_bundle(qd.quantize(tiny_bundle, config, kv_cache=kv), torch.device("meta"), backend="reference",
                                max_batch=2, max_seq_len=64)
    data = pack_rows([[5, 6, 7], [8, 9]], [0, 1], 2, 16, engine.scratch_row).to("meta")
    # the first chunk of a 40-token prompt (a later one's causal_lower_right bias cannot be built under a
    # dispatch mode; a capture on the GPU would fail on a host copy there: test_engine_gpu.py)
    chunk = pack_chunk(list(range(5, 45)), 0, 0, 16).to("meta")
    run_packed(engine.model, data)  # the first run may fill per-device caches (the capture warms up first too)
    run_chunk(engine.model, chunk, 16)
    created_on_device = []
    real_tensor = torch.tensor

    def tensor(*args, **kwargs):  # torch.tensor(..., device=...) copies below the dispatcher: watch it here
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            created_on_device.append(kwargs["device"])
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    with _HostTransfers() as watch:
        logits = run_packed(engine.model, data)
        chunk_logits = run_chunk(engine.model, chunk, 16)
    assert logits.shape == (2, engine.model.args.vocab_size) and chunk_logits.shape == (1, engine.model.args.vocab_size)
    assert watch.seen == [] and created_on_device == []
