"""The engine's KV cache: static, preallocated, one row per running sequence.

Why static rows rather than paged blocks: every row holds ``max_seq_len`` positions of one sequence,
allocated once when the engine starts. Decoding the rows ``0..n-1`` then reads row ``i`` at its own
first ``length[i]`` positions (``attend``, the split-KV kernel on CUDA) or ``cache[:n, :, :L]`` as a
plain view under a mask (CPU): no block tables, no gather, fixed shapes, which is what ``torch.compile``
and CUDA graphs need for the decode step and what a readable engine wants. The price is memory: a row is
reserved for the longest sequence even when its sequence is short, so the number of concurrent
sequences is ``memory / (max_seq_len × per-token bytes)`` rather than ``memory / tokens in use``.
At the sizes this engine targets (a few dozen sequences, contexts of a few thousand tokens) that
fits comfortably (Llama-3.1-8B, 64 rows × 2,048 positions, bf16: 16 GiB); paged blocks are what a
vLLM-scale server needs, and users who outgrow one machine move to vLLM (``quantdeploy export
--format compressed-tensors``, ``formats/compressed_tensors.py``).
The engine keeps the running sequences in the lowest free rows, so a decode step over rows
``0..n-1`` wastes little on holes.

When the checkpoint quantizes the KV cache (``self_attn.k_scale`` / ``v_scale``, see
``quant/kv_cache.py``), rows hold int8 or FP8 E4M3 codes with the static per-head scales: half the
bytes of bf16 (a quarter of fp32), dequantized as they are read.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from quantdeploy.errors import ConfigError
from quantdeploy.quant.kv_cache import dequantize_kv, quantize_kv

CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
DECODE_ATTENTION = ("split_kv", "reduce", "sdpa")  # see models.llama.Attention and StaticKVCache.attend


class StaticKVCache(nn.Module):
    """One layer's keys and values: ``[rows, n_kv_heads, max_seq_len, head_dim]`` each."""

    def __init__(self, rows: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, quant: str | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.quant = quant
        store = CODE_DTYPES[quant] if quant else dtype
        shape = (rows, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=store, device=device), persistent=False)
        if quant:
            self.register_buffer("k_scale", k_scale.float().to(device), persistent=False)
            self.register_buffer("v_scale", v_scale.float().to(device), persistent=False)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position of one row takes in this layer (keys and values)."""
        _, heads, _, dim = self.k_cache.shape
        return 2 * heads * dim * self.k_cache.element_size()

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[B, Hkv, T, D]`` at ``positions [B, T]`` of cache ``rows [B]``."""
        if self.quant:
            k, v = quantize_kv(k, self.k_scale, self.quant), quantize_kv(v, self.v_scale, self.quant)
        idx = rows[:, None]  # [B, 1] broadcasts against positions [B, T]; the indexed view is [B, T, Hkv, D]
        self.k_cache[idx, :, positions] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[idx, :, positions] = v.transpose(1, 2).to(self.v_cache.dtype)

    def attend(self, q: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Decode attention of ``q [B, H, D]`` (one query per row, rows ``0..B-1``) over each row's first
        ``lengths [B]`` cached positions, reading no others (``kernels/triton_attention.py``; CUDA)."""
        scales = (self.k_scale, self.v_scale) if self.quant else (None, None)
        return torch.ops.quantdeploy.decode_attention(q, self.k_cache, self.v_cache, lengths, *scales)

    def read(self, rows: slice | torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, Hkv, length, D]`` in ``dtype``: a view for a slice of rows (unless the
        cache is quantized), a gathered copy for a tensor of row indices."""
        k, v = self.k_cache[rows, :, :length], self.v_cache[rows, :, :length]
        if self.quant:
            return dequantize_kv(k, self.k_scale, dtype), dequantize_kv(v, self.v_scale, dtype)
        return k, v


def choose_decode_attention(name: str | None, device: torch.device, compiled: bool) -> str:
    """The decode attention to run: ``name``, checked, or the default for ``device``."""
    fast = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if name is None:
        name = "split_kv" if fast else ("reduce" if compiled else "sdpa")
    if name not in DECODE_ATTENTION:
        raise ConfigError(f"unknown decode attention '{name}'; available: {', '.join(DECODE_ATTENTION)}")
    if name == "split_kv":
        if not fast:
            raise ConfigError(f"split_kv decode attention needs a CUDA device and the triton package (device: "
                              f"{device}); use 'sdpa' or 'reduce'")
        import quantdeploy.kernels.triton_attention  # noqa: F401 - registers quantdeploy::decode_attention
    return name
