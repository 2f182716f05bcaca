"""The reference quantized matmul: dequantize the whole weight, then an ordinary matmul.

Torch only, works on every device and dtype, and is the oracle that every fast path (Triton, CPU
packed kernels) is tested against. It is deliberately not fast: the dequantized weight is rebuilt on
every call and never cached.

W8A8 specs (``spec.activations``) quantize the input per token first. int8 really computes in
integers: int8 × int8 products accumulated in int32 (``torch._int_mm``), then scaled by the token and
channel scales. fp8 multiplies the E4M3-rounded inputs and weights in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from quantdeploy.quant import nf4
from quantdeploy.quant.primitives import (QuantizedWeight, dequantize_weight, int8_activations_float, int8_weight,
                                          quantize_activations)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the dequantized weight, computed in ``x``'s dtype."""
    if qw.spec.activations == "int8":
        return _w8a8_int8(x, qw, bias)
    if qw.spec.activations == "fp8_e4m3":
        return w8a8_fp8(x, dequantize_weight(qw), bias)
    return F.linear(x, dequantize_weight(qw, x.dtype), bias)


def w8a8_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The FP8 W8A8 product from the dequantized fp32 ``weight``: each token rounded to E4M3 with its own
    scale, multiplied in fp32 (what the reference computes, and ``kernels/dense.py`` with the weight kept)."""
    xq, xs = quantize_activations(x, "fp8_e4m3")
    return F.linear(xq.float() * xs, weight, None if bias is None else bias.float()).to(x.dtype)


#: ``torch._int_mm`` on CUDA takes only more than 16 rows (cuBLASLt's int8 GEMM); fewer are padded with
#: zero rows up to this. The weight is read once either way, so a decode step pays a few rows of compute.
CUDA_INT_MM_MIN_ROWS = 17


#: read once at import: torch.compile cannot trace the query (a compiled W8A8 decode step failed on it)
CPU_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")

#: fp32 sums every partial sum of this many int8 x int8 products exactly (at most 1024 x 128² = 2^24)
EXACT_FP32_K = 1024


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices accumulated in int32, for any number of rows of ``a``.

    On a CPU without AVX-512, ``torch._int_mm`` runs scalar code: 25x slower than an fp32 matmul of
    the same shape on a 2-core AVX2 box (784 vs 32 ms at 1024 x 576 x 960), which made the SmoothQuant
    W8A8 model slower than the original by that much. There ``int_mm_fp32`` computes it instead."""
    if a.device.type == "cpu" and not CPU_AVX512:
        return int_mm_fp32(a, b)
    return int_mm_padded(a, b, CUDA_INT_MM_MIN_ROWS if a.is_cuda else 1)


def int_mm_padded(a: torch.Tensor, b: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``torch._int_mm`` with ``a`` padded by zero rows up to ``min_rows``."""
    rows = a.shape[0]
    if rows < min_rows:
        a = F.pad(a, (0, 0, 0, min_rows - rows))
    return torch._int_mm(a, b)[:rows]


def int_mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int32 ``a @ b`` as fp32 matmuls over slices of ``EXACT_FP32_K`` along K, each exact (every
    partial sum an integer of at most 2^24), added in int32: ``torch._int_mm``'s result bit for bit."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], EXACT_FP32_K):
        out += (a[:, k0:k0 + EXACT_FP32_K].float() @ b[k0:k0 + EXACT_FP32_K].float()).to(torch.int32)
    return out


def fp32_slices(wq: torch.Tensor) -> list[torch.Tensor]:
    """int8 codes ``wq [n, k]`` as fp32 ``[n, EXACT_FP32_K]`` slices along K, for ``int_mm_fp32_held``."""
    return [wq[:, k0:k0 + EXACT_FP32_K].float().contiguous() for k0 in range(0, wq.shape[1], EXACT_FP32_K)]


def int_mm_fp32_held(a: torch.Tensor, slices: list[torch.Tensor]) -> torch.Tensor:
    """``int_mm_fp32`` of ``a [m, k]`` (int8 codes, or the same integers in fp32) and a weight whose codes
    are held in fp32 (``fp32_slices``, made once): the same exact partial sums, without converting the
    weight on every call. One slice's sum is returned in fp32 (exact integers), several are added in int32."""
    if len(slices) == 1:
        return F.linear(a.float(), slices[0])
    out = torch.zeros(a.shape[0], slices[0].shape[0], dtype=torch.int32, device=a.device)
    for i, w in enumerate(slices):
        out += F.linear(a[:, i * EXACT_FP32_K:(i + 1) * EXACT_FP32_K].float(), w).to(torch.int32)
    return out


def _w8a8_int8(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    wq, ws = int8_weight(qw)  # [n, k] int8, [n] fp32
    return w8a8_int8(x, wq.T.contiguous(), ws, bias)


def w8a8_int8(x: torch.Tensor, wq_t: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 int8 product from the signed codes transposed, ``wq_t [k, n]``, and the channel scales
    ``ws [n]``: what the reference computes, and the CPU path (``kernels/cpu_w8a8.py``) with ``wq_t``
    made once."""
    return w8a8_int8_with(x, lambda codes: int_mm(codes, wq_t), ws, bias)


def w8a8_int8_with(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], ws: torch.Tensor,
                   bias: torch.Tensor | None, float_codes: bool = False) -> torch.Tensor:
    """``w8a8_int8`` with the integer product given: ``product(codes [m, k]) -> [m, n]``, the sums in int32
    or as exact integers in fp32; the codes are int8, or with ``float_codes`` the same integers in fp32."""
    xq, xs = int8_activations_float(x) if float_codes else quantize_activations(x, "int8")  # [..., k], [..., 1] fp32
    acc = product(xq.reshape(-1, xq.shape[-1]))  # [m, n]
    y = acc.float() * xs.reshape(-1, 1) * ws.unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def qembedding(ids: torch.Tensor, qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the dequantized embedding table for ``ids``. Only those rows are dequantized (each row's
    codes, scales and zeros are its own; NF4's double-quantized scales are decoded first): a decode step
    looks up one row per sequence, and dequantizing the whole table for it made a step of the bundled
    model with quantized embeddings 14x slower (436 ms against 31, 2 CPU cores)."""
    flat = ids.reshape(-1)
    tensors = dict(qw.tensors)
    if qw.spec.dtype == "nf4" and tensors["scales"].dtype == torch.uint8:
        tensors = {"qweight": tensors["qweight"], "scales": nf4.dequantize_scales(tensors)}
    rows = QuantizedWeight(qw.spec, (flat.numel(), qw.shape[1]), {n: t.index_select(0, flat) for n, t in tensors.items()})
    return dequantize_weight(rows, dtype).reshape(*ids.shape, qw.shape[1])
