"""FP8 W8A8 layers on CUDA: E4M3 weights times E4M3 activations quantized per token, on the FP8 tensor cores.

The math is the reference path's (``reference.qlinear``): each row of x is scaled by its own
``max|x| · fp32(1/448)`` and rounded to E4M3, the products of E4M3 codes are exact in fp32, and the sum is scaled
by the row's and the channel's scales. Two ways to compute it, by the number of rows:

- a few rows (decode): the row kernel (``triton_gemv.py``) with E4M3 codes on both sides, accumulating
  in fp32 (a pass over the weight, half the bytes of bf16; a GEMM's tiles would be mostly padding), the
  row and channel scales applied in the kernel, which writes x's dtype: two kernels a layer, the
  quantizer reading a row of up to 16,384 once;
- more rows: ``torch._scaled_mm`` (cuBLASLt's FP8 GEMM, twice the bf16 tensor-core rate on Hopper) with
  row-wise scales (``scale_a`` per token, ``scale_b`` per channel), its output rounded to bf16 (the
  only output it takes with row-wise scales), then cast to the caller's dtype.

Measured per 8B layer shape on an H200 (``results/nf4-fp8-kernels-h200.txt``): gate/up 1.08x bf16 at one row,
1.19x at 16, 1.51x at 256, 1.67x at 2,048; down 0.89x, 0.67x, 1.13x, 1.39x. Before the row quantizer was one
Triton kernel (six torch kernels), 0.57x-0.85x at one row and 0.63x at 2,048 rows on down. The whole 8B
shape decodes at 1.16x bf16 at batch 1 and 0.95x at 16; before the row scales moved into the row kernel
and the quantizer read a row once, 0.96x and 0.92x (four kernels a layer instead of two).

The weight is used as stored: ``qweight [N, K]`` row-major is ``_scaled_mm``'s column-major ``[K, N]``
operand as a transposed view. Needs FP8 tensor cores (compute capability 8.9 or newer), per-channel
weight scales, and K and N multiples of 16 (cuBLASLt's FP8 alignment).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from quantdeploy.kernels.triton_gemv import gemv_impl
from quantdeploy.kernels.triton_split import counters, sm_count
from quantdeploy.quant.primitives import FP8_MAX

log = logging.getLogger(__name__)

#: the most rows the row kernel takes; ``_scaled_mm`` above (the same bound as the weight-only routes)
ROW_ROWS = 4


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr,
                          ONE_PASS: tl.constexpr):
    """One row of x: its absmax, then its E4M3 codes ``x / s`` with ``s = absmax · fp32(1/448)`` (1 for a
    zero row), as ``primitives.quantize_activations`` computes them (IEEE division, a saturating conversion
    rounding to nearest even). ``ONE_PASS``: the row fits one block and is read once (a decode step's
    quantizers wait on memory latency, not bandwidth: two passes of four blocks cost eight round trips)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax_row = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax_row = tl.max(amax, axis=0)
    scale = tl.where(amax_row > 0, amax_row * (1.0 / FP8_MAX), 1.0)  # the reference's fp32 reciprocal
    tl.store(s_ptr + row, scale)
    if ONE_PASS:
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
            tl.store(q_ptr + row * K + k0 + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=k0 + offs < K)


#: the longest row the quantizer holds in registers at once (16 warps: 32 values a thread)
ONE_PASS_MAX = 16384


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``primitives.quantize_activations(x, "fp8_e4m3")`` for a 2-D x in one kernel (one read of x to
    find each row's absmax, one to write its codes): codes ``[M, K]`` E4M3 and fp32 scales ``[M, 1]``."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(ONE_PASS_MAX, triton.next_power_of_2(k))
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), FP8_MAX=FP8_MAX, BLOCK=block, ONE_PASS=k <= block,
                                    num_warps=max(4, min(16, block // 1024)))
    return q, s


@torch.library.custom_op("quantdeploy::fp8_w8a8_mm", mutates_args=())
def fp8_w8a8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                locks: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` in W8A8 FP8, in x's dtype; ``scales`` fp32 ``[N]``. ``locks``: the row kernel's
    split-K counters, left zeroed (not a mutated input)."""
    m, k = x.shape
    if m == 0:
        return x.new_empty((0, qweight.shape[0]))
    if x.stride(1) != 1:
        x = x.contiguous()
    xq, xs = quantize_rows(x)  # [M, K] E4M3, [M, 1] fp32
    if m <= ROW_ROWS:  # the row scales applied and the output written in x's dtype by the row kernel itself
        return gemv_impl(xq, qweight, scales.reshape(-1, 1), None, 8, k, sm_count(x.device), locks=locks, fp8=True,
                         row_scales=xs.reshape(-1), out_dtype=x.dtype)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scales.reshape(1, -1), out_dtype=torch.bfloat16)
    return y.to(x.dtype)


@fp8_w8a8_mm.register_fake
def _(x, qweight, scales, locks=None):  # noqa: ANN001, ANN202 - the shapes torch.compile needs
    return x.new_empty((x.shape[0], qweight.shape[0]))


def supports(qw) -> bool:  # noqa: ANN001 - a QuantizedWeight
    spec = qw.spec
    q = qw.tensors["qweight"]
    if spec.dtype != "fp8_e4m3" or spec.activations != "fp8_e4m3" or q.device.type != "cuda":
        return False
    n, k = qw.shape
    return (spec.group_for(k) == k and k % 16 == 0 and n % 16 == 0
            and torch.cuda.get_device_capability(q.device) >= (8, 9))


class FP8W8A8:
    """A prepared W8A8 FP8 layer (the stored codes and scales, used as they are)."""

    backend = "triton"

    def __init__(self, qw) -> None:  # noqa: ANN001
        self.qw = qw
        self.scales = qw.tensors["scales"].float().reshape(-1).contiguous()
        device = qw.tensors["qweight"].device
        self.locks = counters(device, sm_count(device))
        log.debug("kernels: fp8 w8a8 %s, row kernel up to %d rows, _scaled_mm above", tuple(qw.shape), ROW_ROWS)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.quantdeploy.fp8_w8a8_mm(rows, self.qw.tensors["qweight"], self.scales, self.locks)
        y = y.reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
