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
dequantize + cuBLAS. So "never slower than bf16" holds today up to
four rows for int4 (the o projection alone: two) and up to two for int8; between them the tile kernel's
tensor-core rate (``triton_gemm.py``) is the limit, and the fix is a mixed-input GEMM that feeds the
tensor cores at their full rate, not dispatch.

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
from quantdeploy.kernels.triton_split import counters

log = logging.getLogger(__name__)

#: per code width, ``(largest M, path)`` in order; above the last bound, dequantize + cuBLAS (the crossover
#: at 128-256 rows for both widths, measured; see the module docstring).
ROUTES: dict[int, tuple[tuple[int, str], ...]] = {4: ((4, "row"), (128, "tile")), 8: ((4, "row"), (128, "tile"))}


def route(bits: int, m: int, routes: dict[int, tuple[tuple[int, str], ...]] | None = None) -> str:
    """The path (``row``, ``tile`` or ``dequant``) an M-row call on ``bits``-bit codes takes."""
    for bound, path in (routes or ROUTES)[bits]:
        if m <= bound:
            return path
    return "dequant"


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def run(path: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
        bits: int, group: int, locks: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` by the named path (the benchmarks time each path at every M through this);
    ``locks``: the layer's split-K counters (``triton_split.counters``; without them, a zeroed buffer per call)."""
    if path == "row":
        return gemv_impl(x, qweight, scales, zeros, bits, group, _sms(x.device), locks=locks)
    if path == "tile":
        return gemm_impl(x, qweight, scales, zeros, bits, group, _sms(x.device), locks=locks)
    if path == "dequant":
        return F.linear(x, dequantize_impl(qweight, scales, zeros, bits, group, x.shape[1], x.dtype))
    raise ValueError(f"unknown path {path!r}")


@torch.library.custom_op("quantdeploy::wonly_mm", mutates_args=())
def wonly_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bits: int, group: int, locks: torch.Tensor | None = None) -> torch.Tensor:
    """``locks`` is written inside a launch and left as it was found (all zero), so it is not a mutated input."""
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[0]))
    return run(route(bits, x.shape[0]), x, qweight, scales, zeros, bits, group, locks)


@wonly_mm.register_fake
def _(x, qweight, scales, zeros, bits, group, locks=None):  # noqa: ANN001, ANN202 - the shapes torch.compile needs
    return x.new_empty((x.shape[0], qweight.shape[0]))


def supports(qw) -> bool:  # noqa: ANN001 - a QuantizedWeight
    """int4/int8 weight-only on CUDA, read as int32 words: K and the group multiples of the codes per word."""
    spec = qw.spec
    q = qw.tensors["qweight"]
    if spec.dtype not in ("int4", "int8") or spec.activations is not None or q.device.type != "cuda":
        return False
    per_word = 32 // spec.bits
    group = spec.group_for(qw.shape[1])
    return qw.shape[1] % per_word == 0 and group % per_word == 0 and q.data_ptr() % 4 == 0


class TritonWeightOnly:
    """A prepared int4/int8 weight-only layer (the canonical tensors used as stored: nothing is copied)."""

    backend = "triton"

    def __init__(self, qw) -> None:  # noqa: ANN001
        self.qw = qw
        self.bits = qw.spec.bits
        self.group = qw.spec.group_for(qw.shape[1])
        self.zeros = None if qw.spec.symmetric else qw.tensors["zeros"]
        self.locks = counters(qw.tensors["qweight"].device, _sms(qw.tensors["qweight"].device))
        log.debug("kernels: triton %s %s, routes by rows %s", qw.spec.describe(), tuple(qw.shape), ROUTES[self.bits])

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        t = self.qw.tensors
        y = torch.ops.quantdeploy.wonly_mm(rows, t["qweight"], t["scales"], self.zeros, self.bits, self.group,
                                           self.locks)
        y = y.reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
