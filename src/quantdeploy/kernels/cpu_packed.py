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
fp32 math.

Both kernels cost time in proportion to the rows of activations (a dot product per row and weight), so
past a few dozen rows (a prefill, a large batch) the dense matmul of the compute dtype wins even after
dequantizing the weight on every call: from ``DENSE_FROM_ROWS`` rows a call dequantizes, then runs
``F.linear``. int8 multiplies its codes as they are and scales the output columns; int4 unpacks the
tinygemm layout (which depends on the CPU's vector width: ``unpack_int4``, checked against the codes
when the weight is packed) and applies the bf16 scales and zeros the kernel uses, so both routes multiply
the same weights. The thresholds come from ``benchmarks/cpu_kernels.py --sweep`` on a 2-core AVX2 box
(record ``cpu-dense-fallback-avx2.txt``: crossovers 48-96 rows for int8 and 96-128 for int4 in two sweeps,
that box being noisy); a 128-token prefill of the bundled model took 338-460 ms in int4 against 450-545
on the kernel alone. int4 stays slower than fp32 there: unpacking 4-bit codes in torch ops costs about a
millisecond per 3072x576 layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from quantdeploy.quant.packing import unpack_bits
from quantdeploy.quant.primitives import QuantizedWeight

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)
#: rows of activations from which a call dequantizes and runs the dense matmul (see the docstring)
DENSE_FROM_ROWS = {"int8": 64, "int4": 128}


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


class _Packed:
    """Routing shared by both widths: the packed kernel below ``dense_from`` rows, the dense route above."""

    backend = "cpu_packed"
    dense_from: int | float

    def kernel(self, x2: torch.Tensor) -> torch.Tensor: ...

    def dense(self, x2: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.dense(x2) if x2.shape[0] >= self.dense_from else self.kernel(x2)
        if bias is not None:
            y = y.float() + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class PackedInt8(_Packed):
    def __init__(self, qw: QuantizedWeight) -> None:
        self.weight = (qw.tensors["qweight"].to(torch.int16) - 128).to(torch.int8).contiguous()  # [n, k]
        self.scales = qw.tensors["scales"].to(torch.bfloat16).reshape(-1).contiguous()  # [n]
        self.dense_scales = qw.tensors["scales"].float().reshape(-1)  # [n]
        self.dense_from = DENSE_FROM_ROWS["int8"]

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        # the codes are integers of at most 8 bits, exact in any float dtype; the scale goes on the output
        return F.linear(x2, self.weight.to(x2.dtype)) * self.dense_scales.to(x2.dtype)


class PackedInt4(_Packed):
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
        self.dense_from = DENSE_FROM_ROWS["int4"]
        if not torch.equal(unpack_int4(self.packed, n, k), codes.to(torch.uint8)):
            self.dense_from = float("inf")  # a layout this code does not know: every call on the kernel
            log.warning("int4 CPU kernel layout unknown on %s: no dense route from %d rows",
                        torch.backends.cpu.get_cpu_capability(), DENSE_FROM_ROWS["int4"])

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group, self.scales_zeros)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dequantize(x2.dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[n, k]`` weight the kernel multiplies: ``(q − 8)·s + z`` with its bf16 scales and zeros."""
        n, k2 = self.packed.shape
        w = unpack_int4(self.packed, n, 2 * k2, dtype)
        sz = self.scales_zeros.to(dtype)  # [k/G, n, 2]
        s, z = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # [n, k/G, 1]
        w.view(n, -1, self.group).mul_(s).add_(z - 8 * s)  # (q − 8)·s + z, in place
        return w


def unpack_int4(packed: torch.Tensor, n: int, k: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The ``[n, k]`` codes (in ``dtype``) of ``torch._convert_weight_to_int4pack_for_cpu``'s layout.

    Rows come in blocks of ``B`` (64 with AVX-512, 32 otherwise), each block stored k-major as
    ``[k, B/2]`` bytes. AVX-512 pairs row ``d`` with ``d+32`` (low, high nibble) in byte ``d`` and
    ``d+16`` with ``d+48`` in byte ``16+d``; AVX2 pairs ``d`` with ``d+16``; a last, shorter block and
    CPUs without either pair neighbouring rows ``2j``, ``2j+1``. Each run of rows is copied straight
    from its nibbles into place (the dtype cast in the same copy).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    block = 64 if capability.startswith("AVX512") else 32
    flat = packed.reshape(-1)
    lo, hi = flat & 15, flat >> 4
    out = torch.empty(n, k, dtype=dtype)
    full = n // block if capability.startswith("AVX") else 0
    if full:
        dst = out[: full * block].view(full, block, k)
        src = [t[: full * block * k // 2].view(full, k, block // 2).transpose(1, 2) for t in (lo, hi)]
        if block == 64:
            runs = [(src[0][:, :16], 0), (src[0][:, 16:], 16), (src[1][:, :16], 32), (src[1][:, 16:], 48)]
        else:
            runs = [(src[0], 0), (src[1], 16)]
        for nibbles, first in runs:
            dst[:, first:first + 16].copy_(nibbles)
    start = full * block
    while start < n:  # neighbouring pairs, block by block
        size = min(block, n - start)
        part = slice(start * k // 2, (start + size) * k // 2)
        dst = out[start:start + size].view(size // 2, 2, k)
        dst[:, 0].copy_(lo[part].view(k, size // 2).T)
        dst[:, 1].copy_(hi[part].view(k, size // 2).T)
        start += size
    return out


def pack(qw: QuantizedWeight) -> PackedInt8 | PackedInt4:
    return PackedInt8(qw) if qw.spec.dtype == "int8" else PackedInt4(qw)
