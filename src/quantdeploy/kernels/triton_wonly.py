"""Weight-only int4/int8 layers on CUDA: which kernel runs at which number of rows, behind one op.

A quantized layer must never be slower than its bf16 layer, and no single kernel is fastest at every M:
- a few rows (decode): the row kernel (``triton_gemv.py``), a pass over the codes in registers shared by
  up to four rows; its time is the weight's bytes and the per-code decode;
- tens to hundreds of rows: the tile kernel (``triton_gemm.py``), codes dequantized in registers into
  tensor-core tiles, the decode paid once per row tile;
- many rows (a long prefill): the weight dequantized once to x's dtype by a Triton kernel, then cuBLAS
  (the matmul's flops are the time there; the extra pass over a bf16 copy is small beside them).

``ROUTES`` holds, per code width, the largest M each path takes: the path with the least time per 8B
decoder layer (qkv + o + gate/up + down) in ``benchmarks/wonly_dispatch.py`` on an H200 against bf16
``F.linear`` (``results/wonly-dispatch-h200.txt``). There, int4 g128 per layer (split-K sums inside the
kernels, ``results/splitk-in-kernel-h200.txt``): 2.43x bf16 at one row, 1.79x at two, 1.06x at four, 0.86x
at 16, 0.70x at 64; int8 per channel 1.56x, 1.20x and 0.87x at one, two and four rows, 0.77x at 8-16 and
0.66x at 64 (those two before that change); both 0.55x at 256, rising to 0.98x / 0.96x at 4,096 by
dequantize + cuBLAS. With the tile kernel's codes spread by joins (``triton_gemm._spread``; same card,
``results/tile-joins-h200.txt``) int8 per layer is 1.00x at four rows (the row kernel 0.85x), 0.99x at 8, 0.96x
at 16, 0.90x at 32, 0.62x at 64; int4 0.87-0.90x at 8-16, 0.72x at 32-64 (barely moved). With the tile
shapes re-swept (``results/tile-shapes-h200.txt``: 64 channels a program, K steps of 128, more programs per
SM) int4 is 1.04x / 1.03x at 8 / 16 rows, 0.79x at 32, 0.82x at 64, 0.55x at 128; int8 1.16x, 1.18x, 0.97x,
0.84x, 0.54x. So "never slower than bf16" holds per layer up to 16 rows for both widths (single shapes are
not: int4's o projection is 0.82x at 16 rows, 0.46x at 64);
past that the tile kernel's tensor-core rate is the limit, and the fix is a mixed-input GEMM that feeds the
tensor cores at their full rate, not dispatch.

NF4 and FP8 weight-only (``results/nf4-fp8-kernels-h200.txt``): per 8B layer at one row NF4 g64 1.61x bf16
and FP8 per channel 1.37x; the 8B-shape engine at batch 1 1.24x and 1.19x. From 16 rows NF4 is 0.29-0.47x (dequantize
+ cuBLAS) and FP8 0.52-0.88x: slower than bf16, as int4 and int8 are there.

Real zero points (``halfquad``'s fp16 zeros) cannot be subtracted inside ``2^23 + q`` (fp32 has no fraction
bits left there), so at preparation each is split into an integer part, used as integer zeros are, and an
fp32 fraction ``f`` the kernels take apart: ``f`` times the sum of x per word in the row kernel, ``f·s`` off
each weight in the tile kernels (``split_zeros``). On an H200 at the 8B shape (``results/halfquad-engine-h200.txt``)
int4 g64 decodes at 1.13x bf16 at batch 1 that way, against 1.38x with integer zeros: the fractions' reads
and the sums of x cost a fifth of the step.

The canonical layout is read as stored (no repacking), so the checkpoint and the kernels share one copy of
the weight. Tile sizes come from fixed rules of (M, N, K), not from autotuning: autotuning benchmarks at
its first call, which must not happen inside a CUDA-graph capture.

The op is registered (``quantdeploy::wonly_mm``) so torch.compile keeps it whole (a fake implementation
gives the output shape) and CUDA graphs replay it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from quantdeploy.kernels.triton_gemm import dequantize_impl, gemm_impl
from quantdeploy.kernels.triton_gemv import gemv_impl
from quantdeploy.kernels.triton_split import counters, sm_count
from quantdeploy.quant import nf4

log = logging.getLogger(__name__)

#: per code kind (the width, or "nf4"), ``(largest M, path)`` in order; above the last bound, dequantize +
#: cuBLAS (the crossover at 128-256 rows for both widths, measured; see the module docstring). NF4's tile
#: path looks its codes up in memory (a load per code: 0.07-0.24x bf16 per 8B layer at 16-64 rows on an
#: H200, below dequantize + cuBLAS's 0.31x), so NF4 goes from the row kernel to dequantize + cuBLAS.
#: FP8 weight-only keeps the row kernel up to four rows (its tile path not re-measured since the joins).
ROUTES: dict[int | str, tuple[tuple[int, str], ...]] = {4: ((4, "row"), (128, "tile")), 8: ((3, "row"), (128, "tile")),
                                                        "nf4": ((4, "row"),), "fp8": ((4, "row"), (128, "tile"))}


def route(kind: int | str, m: int, routes: dict | None = None) -> str:
    """The path (``row``, ``tile`` or ``dequant``) an M-row call on codes of ``kind`` (bits, or "nf4") takes."""
    for bound, path in (routes or ROUTES)[kind]:
        if m <= bound:
            return path
    return "dequant"


def run(path: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
        bits: int, group: int, locks: torch.Tensor | None = None, lut: torch.Tensor | None = None,
        fp8: bool = False, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` by the named path (the benchmarks time each path at every M through this);
    ``locks``: the layer's split-K counters (``triton_split.counters``; without them, a zeroed buffer per call);
    ``lut``: the 16 values NF4's codes index (then no zeros); ``fp8``: the codes are E4M3 bytes; ``offsets``:
    the fractions of real zero points whose integer parts are ``zeros`` (``split_zeros``)."""
    if path == "row":
        return gemv_impl(x, qweight, scales, zeros, bits, group, sm_count(x.device), locks=locks, lut=lut, fp8=fp8,
                         offsets=offsets)
    if path == "tile":
        return gemm_impl(x, qweight, scales, zeros, bits, group, sm_count(x.device), locks=locks, lut=lut, fp8=fp8,
                         offsets=offsets)
    if path == "dequant":
        return F.linear(x, dequantize_impl(qweight, scales, zeros, bits, group, x.shape[1], x.dtype, lut, fp8,
                                           offsets))
    raise ValueError(f"unknown path {path!r}")


@torch.library.custom_op("quantdeploy::wonly_mm", mutates_args=())
def wonly_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bits: int, group: int, locks: torch.Tensor | None = None, lut: torch.Tensor | None = None,
             fp8: bool = False, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``locks`` is written inside a launch and left as it was found (all zero), so it is not a mutated input."""
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[0]))
    kind = "fp8" if fp8 else bits if lut is None else "nf4"
    return run(route(kind, x.shape[0]), x, qweight, scales, zeros, bits, group, locks, lut, fp8, offsets)


@wonly_mm.register_fake
def _(x, qweight, scales, zeros, bits, group, locks=None, lut=None, fp8=False, offsets=None):  # noqa: ANN001, ANN202 - shapes for torch.compile
    return x.new_empty((x.shape[0], qweight.shape[0]))


def nf4_scales(qw) -> torch.Tensor:  # noqa: ANN001 - a QuantizedWeight
    """NF4's per-group absmax as the kernels read it, made once at load: double-quantized scales decoded
    (the 8-bit codes' map lookup, block scale and offset are per group, not per code), stored as fp16
    when every value is a normal fp16 (relative rounding ≤ 2^-11, below the bf16 rounding of the weights
    the reference path multiplies by), else fp32. Costs 0.25 bits per weight at groups of 64 over the
    stored 0.127 of double quantization."""
    t = qw.tensors
    absmax = nf4.dequantize_scales(t) if t["scales"].dtype == torch.uint8 else t["scales"].float()
    a = absmax.abs()
    fits = bool(((a == 0) | ((a >= torch.finfo(torch.float16).tiny) & (a <= torch.finfo(torch.float16).max))).all())
    return (absmax.half() if fits else absmax).contiguous()


def split_zeros(zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real zero points (``QuantSpec.float_zeros``) as the kernels take them: integer parts in ``[0, 2^b - 1]``
    (uint8, subtracted inside ``2^23 + q`` as integer zeros are, exactly) and the rest as fp32 fractions
    (``q - z = (q - zi) - f``; the kernels subtract ``f`` times the sum of x, or ``f·s`` from a tile)."""
    z = zeros.float()
    whole = torch.round(z).clamp(0, 2**bits - 1)
    return whole.to(torch.uint8).contiguous(), (z - whole).contiguous()


def supports(qw) -> bool:  # noqa: ANN001 - a QuantizedWeight
    """int4/int8/NF4/FP8 weight-only on CUDA, read as int32 words: K and the group multiples of the codes per word."""
    spec = qw.spec
    q = qw.tensors["qweight"]
    if spec.dtype not in ("int4", "int8", "nf4", "fp8_e4m3") or spec.activations is not None or q.device.type != "cuda":
        return False
    per_word = 32 // spec.bits
    group = spec.group_for(qw.shape[1])
    return qw.shape[1] % per_word == 0 and group % per_word == 0 and q.data_ptr() % 4 == 0


class TritonWeightOnly:
    """A prepared int4/int8/NF4/FP8 weight-only layer. The codes are used as stored (nothing is copied);
    NF4's scales are decoded once (``nf4_scales``) and its 16 levels sit on the device."""

    backend = "triton"

    def __init__(self, qw) -> None:  # noqa: ANN001
        self.qw = qw
        self.bits = qw.spec.bits
        self.group = qw.spec.group_for(qw.shape[1])
        device = qw.tensors["qweight"].device
        nf4_codes = qw.spec.dtype == "nf4"
        self.fp8 = qw.spec.dtype == "fp8_e4m3"
        self.zeros = None if qw.spec.symmetric or nf4_codes or self.fp8 else qw.tensors["zeros"]
        self.offsets = None
        if qw.spec.float_zeros:
            self.zeros, self.offsets = split_zeros(self.zeros, self.bits)
        self.scales = nf4_scales(qw) if nf4_codes else qw.tensors["scales"]
        self.lut = nf4.nf4_levels(device) if nf4_codes else None
        self.locks = counters(device, sm_count(device))
        log.debug("kernels: triton %s %s, routes by rows %s", qw.spec.describe(), tuple(qw.shape),
                  ROUTES["nf4" if nf4_codes else "fp8" if self.fp8 else self.bits])

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.quantdeploy.wonly_mm(rows, self.qw.tensors["qweight"], self.scales, self.zeros, self.bits,
                                           self.group, self.locks, self.lut, self.fp8, self.offsets)
        y = y.reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
