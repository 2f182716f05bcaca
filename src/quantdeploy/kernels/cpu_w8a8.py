"""W8A8 int8 on the CPU: each token quantized to int8, multiplied by the int8 weight in integers.

The reference path computes exactly this (``reference.w8a8_int8``: per-token int8 codes, ``int_mm`` with
int32 accumulation, then the token and channel scales), but makes the signed, transposed codes from the
stored weight on every call: a copy of the weight per call, as much memory traffic as the product
itself. Here they are made once, when the weight is prepared; the arithmetic is the reference's,
so the outputs are equal bit for bit.

Why this path matters on a CPU: with AVX-512 VNNI, ``torch._int_mm`` (oneDNN) keeps its speed as rows
grow, where PyTorch's weight-only ``_weight_int8pack_mm`` costs time per row. Bundled SmolLM2 on a
2-core EPYC (``benchmarks/engine_cpu.py``, record ``engine-cpu-vs-llamacpp-smollm2-epyc.txt``): W8A8
decodes 235.8 / 363.9 tok/s at batch 1 / 8 against weight-only int8's 90.5 / 336.8 and llama.cpp
Q8_0's 141.8 / 247.3. llama.cpp's Q8_0 and Q4_0 dot products quantize the activations to 8 bits too
(per block of 32, where W8A8 takes one scale per token: its KLD is higher, 0.0104 against 0.0057).
Without AVX-512, ``torch._int_mm`` runs scalar code (``reference.int_mm``). There our own integer kernel
(``cpu_native.cpp``'s ``w8a8_mm``: the tokens quantized in the same op, int8 widened to int16,
``vpmaddwd`` pairs, exact int32 sums, the scales applied in the reference's order, AVX2) computes the
same result from the int8 codes, 1 byte a weight; where it cannot be built, the codes
are held in fp32, converted once (4 bytes a weight, the memory of the fp32 model), and summed exactly
by the fp32 matmul (``reference.int_mm_fp32_held``). Every route gives the reference's bits.
"""

from __future__ import annotations

import torch

from quantdeploy.kernels import cpu_native
from quantdeploy.kernels.reference import CPU_AVX512, fp32_slices, int_mm_fp32_held, int_mm_padded, w8a8_int8_with
from quantdeploy.quant.primitives import QuantizedWeight, int8_weight

ROUTES = ("int_mm", "native", "fp32")


def supports(qw: QuantizedWeight) -> bool:
    """int8 weights per output channel, symmetric, with int8 activations (what SmoothQuant writes)."""
    spec = qw.spec
    return spec.activations == "int8" and spec.dtype == "int8" and spec.group_size is None and spec.symmetric


def default_route(k: int) -> str:
    """``int_mm`` with AVX-512 (oneDNN's VNNI kernels), else ours where it runs (K a multiple of 32), else fp32."""
    if CPU_AVX512:
        return "int_mm"
    return "native" if k % 32 == 0 and cpu_native.available() else "fp32"


class CPUW8A8:
    """``route`` (``ROUTES``): int8 codes through ``torch._int_mm``, through our ``w8a8_mm``, or held in fp32."""

    backend = "cpu_packed"

    def __init__(self, qw: QuantizedWeight, route: str | None = None) -> None:
        wq, self.ws = int8_weight(qw)
        self.route = route or default_route(wq.shape[1])
        if self.route not in ROUTES:
            raise ValueError(f"unknown W8A8 route {self.route!r}; routes: {', '.join(ROUTES)}")
        if self.route == "native" and not cpu_native.available():
            raise ValueError(f"the native W8A8 route cannot run here: {cpu_native.unavailable()}")
        self.wq_t = wq.T.contiguous() if self.route == "int_mm" else None  # [k, n]: the operand _int_mm takes
        self.wq = wq.contiguous() if self.route == "native" else None  # [n, k]: ours
        self.slices = fp32_slices(wq) if self.route == "fp32" else None
        self.read_bytes = wq.numel() * (4 if self.route == "fp32" else 1) + 4 * self.ws.numel()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.route == "native":  # the whole of w8a8_int8_with in one op: tokens, product and scales
            y = torch.ops.quantdeploy_cpu.w8a8_mm(x.reshape(-1, x.shape[-1]).float().contiguous(), self.wq, self.ws)
            if bias is not None:
                y = y + bias.float()
            return y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return w8a8_int8_with(x, self._product, self.ws, bias, float_codes=self.route == "fp32")

    def _product(self, codes: torch.Tensor) -> torch.Tensor:
        if self.route == "int_mm":
            return int_mm_padded(codes, self.wq_t, 1)
        return int_mm_fp32_held(codes, self.slices)
