"""KV-cache quantization: keys and values stored as int8 or FP8 E4M3 with static per-head scales.

Why static, per head: one fp32 scale per KV head and layer (``k_scale``, ``v_scale``, shape
``[num_kv_heads]``) is calibrated once, from the keys (after RoPE) and values that the *quantized*
model produces on calibration data: ``scale = max|K_h| / 127`` for int8, ``/ 448`` for E4M3. A
preallocated cache then holds one byte per element and no per-token scales, and the decode kernel
needs one multiply per head. Values beyond the calibrated range saturate (int8 codes span -128..127:
a negative outlier keeps one more step, and the grid is compressed-tensors' own, so an exported KV
cache gives the consumer our codes exactly; on the bundled SmolLM2 2e-6 of the codes on held-out text
fall past the calibrated range, and clamping those at -127 rather than -128 alone moved the logits by a
mean KLD of 1e-3). A static scale also makes
quantization idempotent (re-quantizing a cached entry with the same scale returns it unchanged), so
fake-quantizing the whole K/V that reaches attention is exactly what a quantized cache would give:
that is how the effect is evaluated here. The tensor names are those vLLM reads for its FP8 KV
cache (``self_attn.k_scale`` / ``v_scale``), so exporters can pass them on.

On a transformers model the quantization is installed through transformers' attention interface
(two registered attention functions: one observes K/V during calibration, one quantizes them and then
runs SDPA); our engine stores the codes in its cache instead.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.primitives import FP8_MAX

log = logging.getLogger(__name__)

KV_DTYPES = {"int8": 127.0, "fp8_e4m3": FP8_MAX}  # dtype → largest code magnitude
QUANTIZED = "quantdeploy_kv"  # names of the registered attention functions
OBSERVING = "quantdeploy_kv_observe"


@dataclasses.dataclass(frozen=True)
class KVCacheConfig(Config):
    """dtype: int8 or fp8_e4m3. calibration: the data the per-head scales are measured on."""

    TYPE = "kv_cache"
    VERSION = 1

    dtype: str = "int8"
    calibration: CalibrationConfig = CalibrationConfig()

    def validate(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"kv cache dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")


def kv_scale(absmax: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per-head scales from per-head ``max|x|`` (1.0 where a head never fired)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / KV_DTYPES[dtype], torch.ones_like(absmax))


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """Codes of ``x [batch, heads, seq, head_dim]`` with per-head ``scale [heads]`` (int8 or float8_e4m3fn)."""
    y = x.float() / scale.float().reshape(1, -1, 1, 1)
    if dtype == "int8":
        return torch.round(y).clamp(-128, 127).to(torch.int8)  # the whole int8 range, as compressed-tensors' grid
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float().reshape(1, -1, 1, 1)).to(dtype)


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    return dequantize_kv(quantize_kv(x, scale, dtype), scale, x.dtype)


# ------------------------------------------------------------------------------- transformers glue
def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The self-attention modules (those with ``k_proj`` and ``v_proj``), by name."""
    found = {n: m for n, m in model.named_modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")}
    if not found:
        raise ConfigError("kv-cache quantization needs attention modules with k_proj/v_proj (Llama family)")
    return found


def _kv_heads(attn: nn.Module) -> int:
    return attn.k_proj.out_features // attn.head_dim


def _sdpa(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001 - transformers' signature
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _quantized_attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001
    dtype = module.kv_cache_dtype
    key = fake_quantize_kv(key, module.k_scale, dtype)
    value = fake_quantize_kv(value, module.v_scale, dtype)
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def _observing_attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001
    for name, x in (("k_absmax", key), ("v_absmax", value)):
        m = x.detach().abs().amax(dim=(0, 2, 3)).float()
        setattr(module, name, torch.maximum(getattr(module, name), m))
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(QUANTIZED, _quantized_attention)
    AttentionInterface.register(OBSERVING, _observing_attention)


def _set_attention(model: nn.Module, name: str) -> str:
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    return previous


@torch.no_grad()
def calibrate(model: nn.Module, tokens: torch.Tensor, device: torch.device, config: KVCacheConfig) -> None:
    """Measure per-head K/V ranges of ``model`` on ``tokens`` block by block on ``device``, then install
    the quantized attention with the resulting scales."""
    from quantdeploy.quant.sequential import run_sequential

    attns = attention_modules(model)
    for attn in attns.values():
        zeros = torch.zeros(_kv_heads(attn), device=device)
        attn.k_absmax, attn.v_absmax = zeros, zeros.clone()
    previous = _set_attention(model, OBSERVING)
    try:
        run_sequential(model, tokens, device, batch_size=1, per_block=lambda *a: None)
    finally:
        model.set_attn_implementation(previous)
    scales = {}
    for name, attn in attns.items():
        scales[name] = (kv_scale(attn.k_absmax.cpu(), config.dtype), kv_scale(attn.v_absmax.cpu(), config.dtype))
        del attn.k_absmax, attn.v_absmax
    install(model, config.dtype, scales)


def install(model: nn.Module, dtype: str, scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Give each attention module ``k_scale``/``v_scale`` buffers (ones when ``scales`` is None, for a
    checkpoint to fill) and switch the model to the quantized-cache attention."""
    KVCacheConfig(dtype=dtype)  # validates
    for name, attn in attention_modules(model).items():
        device = attn.k_proj.qweight.device if hasattr(attn.k_proj, "qweight") else attn.k_proj.weight.device
        k, v = scales[name] if scales is not None else (torch.ones(_kv_heads(attn)),) * 2
        attn.register_buffer("k_scale", k.float().to(device).clone())
        attn.register_buffer("v_scale", v.float().to(device).clone())
        attn.kv_cache_dtype = dtype
    _set_attention(model, QUANTIZED)
