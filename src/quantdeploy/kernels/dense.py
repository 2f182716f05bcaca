"""Weights that no kernel of their device serves, held dequantized.

The reference path rebuilds the dequantized weight on every call. For a format with no fast kernel on
the device that makes the quantized model far slower than the original: on the bundled SmolLM2 with 2
CPU cores (AVX2), NF4 g64 decoded 1.9 tok/s at batch 1 and FP8 1.8, against 14.6 for the unquantized
model. Quantization must never make a workload slower, so such a weight-only layer is dequantized once,
when it is prepared, into the compute dtype, and multiplied by the device's dense matmul: the speed of
the unquantized layer and the numbers of the reference path (the same dequantization, kept instead of
rebuilt), at the memory of the unquantized layer. The engine logs how many layers and bytes that is;
``backend="reference"`` keeps the codes alone (slow, small) and ``backend="dense"`` asks for this path
by name. FP8 W8A8 without FP8 tensor cores (the CPU) is served the same way, its weight kept in fp32
and each call still rounding the tokens to E4M3 as the format defines (``reference.w8a8_fp8``): per-call
dequantization decoded it at 0.24-0.33x the fp32 original on 2 AVX2 cores. int8 W8A8 is not served here
(its integer products are ``cpu_w8a8.py``'s or the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantdeploy.kernels.reference import w8a8_fp8
from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight


def supports(qw: QuantizedWeight) -> bool:
    return qw.spec.activations in (None, "fp8_e4m3")


class DenseWeight:
    """The dequantized weight in ``dtype`` (FP8 W8A8: in fp32, the reference's), multiplied as an ordinary Linear's."""

    backend = "dense"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        self.fp8_activations = qw.spec.activations == "fp8_e4m3"
        self.weight = dequantize_weight(qw, torch.float32 if self.fp8_activations else dtype)

    @property
    def read_bytes(self) -> int:
        """Bytes a call reads for the weight (what a decode step streams, instead of the stored codes)."""
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8_activations:
            return w8a8_fp8(x, self.weight, bias)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
