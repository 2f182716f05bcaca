"""PyTorch's packed CPU kernels for weight-only int8 and int4 matmul.

- int8, symmetric, per output channel: ``torch._weight_int8pack_mm(x, w_int8 [n, k], scales [n])``.
  Our codes are stored offset by 128 (``w = s·(q − 128)``), so the kernel's signed weight is ``q − 128``.
- int4, symmetric or asymmetric, any group that is a multiple of 32 (per channel included) along the
  input: ``torch._weight_int4pack_mm_for_cpu`` on the tinygemm layout made by
  ``torch._convert_weight_to_int4pack_for_cpu``. That kernel computes ``w = (q − 8)·s + z`` with a
  *float* zero ``z`` per group; ours is ``w = s·(q − z_int)``, which is the same with
  ``z = s·(8 − z_int)`` (0 for symmetric grids): the weights it multiplies are exactly ours. The kernel
  takes groups of 32, 64, 128 or 256 only; a group of another multiple of 32 is split into sub-groups of
  the largest of those that divides it, each repeating its group's scale and zero (exact). That matters:
  RTN's "groups of 128" on a 576-wide layer (SmolLM2) are groups of 96, and those layers used to fall
  back to the reference path, which dequantizes the whole weight on every call (16 rows of the bundled
  model: 54.8 tok/s int4 against 122.5 fp32, most of the time in unpacking).

Both run with bf16 activations and return bf16: their fp32 variants are scalar code, 10-20× slower than
an fp32 matmul on an AVX-512 Xeon, while the bf16 ones are vectorized (measured: 576×1536 int8 at one
token, 0.70 ms fp32 vs 0.04 ms bf16). So a quantized layer on this path rounds its input to bf16 (8
mantissa bits, as llama.cpp rounds its activations to 8-bit for Q8_0 dot products), accumulates in
fp32 and rounds its output to bf16; the result is cast back to the caller's dtype. The kernels also
take their scales (and int4 float zeros) in bf16 only, so each group's scale is rounded from fp16 to
bf16 (relative error ≤ 2⁻⁹, far below the quantization step of int4 and about half a step of int8).
Tests bound the difference to the reference path at that level; ``backend="reference"`` keeps exact
fp32 math. Everything else uses the reference path.
"""

from __future__ import annotations

import torch

from quantdeploy.quant.packing import unpack_bits
from quantdeploy.quant.primitives import QuantizedWeight

INT4_GROUPS = (32, 64, 128, 256)


def kernel_group(group: int) -> int | None:
    """The largest group the int4 kernel takes that divides ``group`` (None: no multiple of 32)."""
    return next((g for g in reversed(INT4_GROUPS) if group % g == 0), None)


def supports(qw: QuantizedWeight) -> bool:
    spec = qw.spec
    if spec.activations is not None:
        return False
    if spec.dtype == "int8":
        return spec.symmetric and spec.group_size is None
    if spec.dtype == "int4":
        return kernel_group(spec.group_for(qw.shape[1])) is not None and qw.shape[1] % 16 == 0
    return False


class PackedInt8:
    backend = "cpu_packed"

    def __init__(self, qw: QuantizedWeight) -> None:
        self.weight = (qw.tensors["qweight"].to(torch.int16) - 128).to(torch.int8).contiguous()  # [n, k]
        self.scales = qw.tensors["scales"].to(torch.bfloat16).reshape(-1).contiguous()  # [n]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        if bias is not None:
            y = y.float() + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class PackedInt4:
    backend = "cpu_packed"

    def __init__(self, qw: QuantizedWeight) -> None:
        n, k = qw.shape
        group = qw.spec.group_for(k)
        self.group = kernel_group(group)
        repeat = group // self.group  # sub-groups per stored group, each with its group's scale and zero
        codes = unpack_bits(qw.tensors["qweight"], 4, k).to(torch.int32)  # [n, k]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)  # tinygemm layout [n, k/2]
        scales = qw.tensors["scales"].float()  # [n, k/G]
        if qw.spec.symmetric:
            zeros = torch.zeros_like(scales)
        else:
            zeros = scales * (8.0 - qw.tensors["zeros"].float())
        scales, zeros = scales.repeat_interleave(repeat, dim=1), zeros.repeat_interleave(repeat, dim=1)
        self.scales_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()  # [k/G, n, 2]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        if bias is not None:
            y = y.float() + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def pack(qw: QuantizedWeight) -> PackedInt8 | PackedInt4:
    return PackedInt8(qw) if qw.spec.dtype == "int8" else PackedInt4(qw)
