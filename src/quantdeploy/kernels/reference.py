"""The reference quantized matmul: dequantize the whole weight, then an ordinary matmul.

Torch only, works on every device and dtype, and is the oracle that every fast path (Triton, CPU
packed kernels) is tested against. It is deliberately not fast: the dequantized weight is rebuilt on
every call and never cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the dequantized weight, computed in ``x``'s dtype."""
    return F.linear(x, dequantize_weight(qw, x.dtype), bias)


def qembedding(ids: torch.Tensor, qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the dequantized embedding table for ``ids``."""
    return F.embedding(ids, dequantize_weight(qw, dtype))
