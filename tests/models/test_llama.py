"""The compact model against transformers: same weights, same logits (fp32, max abs diff < 1e-4)."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine.kv_cache import BlockTable, PagedKVCache
from quantdeploy.engine.loading import from_bundle
from quantdeploy.errors import ModelSourceError
from quantdeploy.models.bundle import ModelBundle, SourceInfo
from quantdeploy.models.llama import ModelArgs, rope_tables

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _hf(kind: str, **extra):
    import transformers as tf

    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SHAPE, **extra})).eval()
    with torch.no_grad():  # every tensor random, biases and norms included, so nothing can hide behind an init
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return model


def _ours(model):
    return from_bundle(ModelBundle(model=model, tokenizer=None, source=SourceInfo(path="memory", kind="memory"))).model


CASES = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-yarn-rope": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": 128}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    kind, extra = CASES[case]
    model = _hf(kind, **extra)
    ours = _ours(model)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, ours(ids)
    assert ref.abs().max() > 1.0  # logits of a real spread, not a near-constant
    assert (out - ref).abs().max().item() < 1e-4


def test_rope_variants_change_the_tables():
    tables = {}
    for case in ("llama-tied", "llama3-rope", "llama-linear-rope", "llama-yarn-rope"):
        kind, extra = CASES[case]
        tables[case] = rope_tables(_hf(kind, **extra).config, 128)[0]
    assert all(not torch.equal(tables["llama-tied"], t) for c, t in tables.items() if c != "llama-tied")


def _cached(kind: str, length: int, seed: int):
    """A random HF model, ours built from it with a 4-row cache of 64 positions, and 2 random sequences."""
    model = _hf(kind)
    ours = _ours(model)
    a = ours.args
    table = BlockTable.contiguous(4, 64, "cpu")
    ours.attach_cache(lambda i, att: PagedKVCache(table, a.n_kv_heads, a.head_dim, torch.float32, "cpu"))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))
    return model, ours, ids


def test_prefill_and_decode_with_a_cache_match_the_full_forward():
    model, ours, ids = _cached("qwen2", 40, seed=2)
    with torch.no_grad():
        ref = model(ids).logits
        first = ours.prefill(ids[0:1, :30], rows=2, last_only=False)  # sequence 0 in row 2
        ours.prefill(ids[1:2, :12], rows=0)  # sequence 1 in row 0, in two chunks
        chunk = ours.prefill(ids[1:2, 12:20], rows=0, start=12, last_only=False)
        # rows 0..2 at different positions; row 1 is a free row decoding a dummy token
        step = ours.decode(torch.stack([ids[1, 20], ids[0, 0], ids[0, 30]]), torch.tensor([20, 0, 30]), kv_len=64)
    assert (first[0] - ref[0, :30]).abs().max() < 1e-4
    assert (chunk[0] - ref[1, 12:20]).abs().max() < 1e-4
    assert (step[2] - ref[0, 30]).abs().max() < 1e-4
    assert (step[0] - ref[1, 20]).abs().max() < 1e-4


def test_a_padded_batch_prefill_matches_each_sequence_alone():
    model, ours, ids = _cached("llama", 24, seed=3)
    lengths = torch.tensor([24, 9])
    padded = ids.clone()
    padded[1, 9:] = 0  # sequence 1 is 9 tokens long, right-padded
    with torch.no_grad():
        ref = model(ids).logits
        last = ours.prefill(padded, torch.tensor([3, 1]), lengths=lengths)  # rows 3 and 1
        # decode on from both rows: row 1 continues at position 9, over the padding it wrote
        tokens = torch.tensor([0, ids[1, 9], 0, ids[0, 23]])
        step = ours.decode(tokens, torch.tensor([0, 9, 0, 23]), kv_len=64)
    assert last.shape == (2, 1, SHAPE["vocab_size"])
    assert (last[0, 0] - ref[0, 23]).abs().max() < 1e-4
    assert (last[1, 0] - ref[1, 8]).abs().max() < 1e-4
    assert (step[1] - ref[1, 9]).abs().max() < 1e-4


@pytest.mark.slow
def test_bundled_smollm2_logits_match_transformers(bundled_bundle):
    smollm2 = bundled_bundle
    ours = _ours(smollm2.model)
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, out = smollm2.model(ids).logits, ours(ids)
    assert (out - ref).abs().max().item() < 1e-4


def test_unsupported_architecture_is_one_clear_error():
    from transformers import GPT2Config

    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported by the engine"):
        ModelArgs.from_hf(GPT2Config())
