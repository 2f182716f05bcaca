"""GPTQ's inner column loop as one Triton kernel per lazy block (GPU only; imported lazily by
``quant/gptq_solver.py`` when the weights are on a CUDA device).

The reference loop (``quant/gptq_solver.quantize_columns``) quantizes the ``B`` columns of a lazy
block one at a time, each step a handful of small kernel launches: on an 8B model that is ~40,000
columns per decoder layer and the GPU sits idle between launches. The rows of ``W`` are independent
within a block (every update is row-local: ``W[r, i+1:] -= err[r] · Hinv[i, i+1:]``), so one program
takes ``BLOCK_R`` rows, keeps their ``[BLOCK_R, B]`` tile in registers and runs all ``B`` steps
itself; the only shared input is the ``B × B`` block of ``H⁻¹``'s Cholesky factor, read one row per
step. One launch per block instead of ~12 per column.

Scales and zero points are per column and known before the columns start (the solver splits a block
at group starts when it chooses them on the fly). Widths that are not a power of two are padded and
masked. Rounding is ``rint`` (half to even), as ``torch.round``;
the arithmetic is fp32 as in the reference, so codes agree except where a value lands within an ulp
of a rounding boundary (the tests bound how often, and the output error).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _gptq_block_kernel(W_ptr, S_ptr, Z_ptr, Hinv_ptr, Q_ptr, E_ptr, rows, width, stride_w, stride_h, maxq,
                       BP: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BP)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    offs = r[:, None] * stride_w + c[None, :]
    W = tl.load(W_ptr + offs, mask=mask, other=0.0)
    S = tl.load(S_ptr + offs, mask=mask, other=1.0)
    Z = tl.load(Z_ptr + offs, mask=mask, other=0.0)
    Q = tl.zeros((BLOCK_R, BP), dtype=tl.float32)
    E = tl.zeros((BLOCK_R, BP), dtype=tl.float32)
    for i in range(width):
        here = (c == i)[None, :]
        w = tl.sum(tl.where(here, W, 0.0), axis=1)
        s = tl.sum(tl.where(here, S, 0.0), axis=1)
        z = tl.sum(tl.where(here, Z, 0.0), axis=1)
        q = tl.minimum(tl.maximum(libdevice.rint(w / s) + z, 0.0), maxq)
        d = tl.load(Hinv_ptr + i * stride_h + i)
        err = (w - s * (q - z)) / d
        h = tl.load(Hinv_ptr + i * stride_h + c, mask=(c > i) & (c < width), other=0.0)
        W = W - err[:, None] * h[None, :]
        Q = tl.where(here, q[:, None], Q)
        E = tl.where(here, err[:, None], E)
    tl.store(Q_ptr + offs, Q.to(tl.uint8), mask=mask)
    tl.store(E_ptr + offs, E, mask=mask)


def quantize_columns(W1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, Hinv1: torch.Tensor,
                     maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and scaled errors (fp32), both ``[rows, width]``, of consecutive columns: the same
    contract as the reference ``gptq_solver.quantize_columns``. Inputs are fp32 CUDA tensors."""
    rows, width = W1.shape
    if width > 256:
        raise ValueError(f"the Triton GPTQ block handles up to 256 columns at a time, got {width}")
    W1, S1, Z1, Hinv1 = (t.float().contiguous() for t in (W1, S1, Z1, Hinv1))
    Q = torch.empty(rows, width, dtype=torch.uint8, device=W1.device)
    E = torch.empty(rows, width, dtype=torch.float32, device=W1.device)
    padded = triton.next_power_of_2(max(width, 16))
    block_r = 16 if padded > 64 else 32
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](W1, S1, Z1, Hinv1, Q, E, rows, width, W1.stride(0),
                                                      Hinv1.stride(0), float(maxq), BP=padded, BLOCK_R=block_r,
                                                      num_warps=4)
    return Q, E
