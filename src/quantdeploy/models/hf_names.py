"""The one place that knows Hugging Face tensor names for the Llama family, and ours.

transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` share one naming
scheme; our compact model (``models/llama.py``) uses gpt-fast's. Any suffix after the module name
(``weight``, ``bias``, or a quantized module's ``qweight``/``scales``/``zeros``/...) is carried over
unchanged, so quantized checkpoints map exactly like unquantized ones. The q/k/v and gate/up
projections map to the parts of a ``MultiLinear`` (``wqkv.parts.0..2``, ``w13.parts.0..1``), which the
engine may fuse after loading.
"""

from __future__ import annotations

import re

# (HF module pattern, our module template): patterns are anchored and matched on module names.
_MODULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens", "tok_embeddings"),
    (r"model\.norm", "norm"),
    (r"lm_head", "output"),
    (r"model\.layers\.(\d+)\.input_layernorm", "layers.{0}.attention_norm"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm", "layers.{0}.ffn_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", "layers.{0}.attention.wqkv.parts.0"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", "layers.{0}.attention.wqkv.parts.1"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", "layers.{0}.attention.wqkv.parts.2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", "layers.{0}.attention.wo"),
    (r"model\.layers\.(\d+)\.self_attn", "layers.{0}.attention"),  # k_scale / v_scale (KV-cache quantization)
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", "layers.{0}.feed_forward.w13.parts.0"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", "layers.{0}.feed_forward.w13.parts.1"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", "layers.{0}.feed_forward.w2"),
]
_COMPILED = [(re.compile(p), t) for p, t in _MODULES]

# Non-persistent or derived tensors that transformers may put in a state dict; not model weights.
_SKIP = re.compile(r".*(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq)$")


def our_module(hf_module: str) -> str | None:
    """Our module name for an HF module name, or None if it has no counterpart."""
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(hf_module)
        if m:
            return template.format(*m.groups())
    return None


def our_tensor(hf_tensor: str) -> str | None:
    """Our tensor name for an HF tensor name (``module.suffix``), or None if it is not a model weight."""
    if _SKIP.fullmatch(hf_tensor):
        return None
    module, _, suffix = hf_tensor.rpartition(".")
    ours = our_module(module)
    return None if ours is None else f"{ours}.{suffix}"


def convert_state_dict(hf: dict) -> tuple[dict, list[str]]:
    """Rename an HF state dict to ours; returns it and the HF names that had no counterpart."""
    out, unknown = {}, []
    for name, tensor in hf.items():
        ours = our_tensor(name)
        if ours is None:
            if not _SKIP.fullmatch(name):
                unknown.append(name)
            continue
        out[ours] = tensor
    return out, unknown
