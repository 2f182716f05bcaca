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
Without AVX-512, ``torch._int_mm`` runs scalar code (``reference.int_mm``), and the reference sums exact
fp32 products instead, converting the weight's codes to fp32 on every call. There the codes are held in
fp32, converted once (4 bytes a weight, the memory of the fp32 model), and the tokens' codes stay fp32:
the same exact sums. On a 2-core AVX2 EPYC, eager, the SmoothQuant model went from 0.72-0.84x the fp32
original at 4 to 16 rows to 0.78-0.90x; the per-token quantization and the scales, unfused eager ops,
are what is left (record ``results/cpu-formats-vs-fp32-avx2.txt``).
"""

from __future__ import annotations

import torch

from quantdeploy.kernels.reference import CPU_AVX512, fp32_slices, int_mm_fp32_held, int_mm_padded, w8a8_int8_with
from quantdeploy.quant.primitives import QuantizedWeight, int8_weight


def supports(qw: QuantizedWeight) -> bool:
    """int8 weights per output channel, symmetric, with int8 activations (what SmoothQuant writes)."""
    spec = qw.spec
    return spec.activations == "int8" and spec.dtype == "int8" and spec.group_size is None and spec.symmetric


class CPUW8A8:
    """``integer_mm``: int8 codes through ``torch._int_mm`` (default with AVX-512), else fp32 codes."""

    backend = "cpu_packed"

    def __init__(self, qw: QuantizedWeight, integer_mm: bool = CPU_AVX512) -> None:
        wq, self.ws = int8_weight(qw)
        self.wq_t = wq.T.contiguous() if integer_mm else None  # [k, n]: the operand _int_mm takes
        self.slices = None if integer_mm else fp32_slices(wq)
        self.read_bytes = wq.numel() * (1 if integer_mm else 4) + 4 * self.ws.numel()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return w8a8_int8_with(x, self._product, self.ws, bias, float_codes=self.wq_t is None)

    def _product(self, codes: torch.Tensor) -> torch.Tensor:
        if self.wq_t is not None:
            return int_mm_padded(codes, self.wq_t, 1)
        return int_mm_fp32_held(codes, self.slices)
