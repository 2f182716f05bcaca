"""Weights that no kernel of their device serves, held dequantized.

The reference path rebuilds the dequantized weight on every call. For a format with no fast kernel on
the device that makes the quantized model far slower than the original: on the bundled SmolLM2 with 2
CPU cores (AVX2), NF4 g64 decoded 1.9 tok/s at batch 1 and FP8 1.8, against 14.6 for the unquantized
model. Quantization must never make a workload slower, so such a weight-only layer is dequantized once,
when it is prepared, into the compute dtype, and multiplied by the device's dense matmul: the speed of
the unquantized layer and the numbers of the reference path (the same dequantization, kept instead of
rebuilt), at the memory of the unquantized layer. The engine logs how many layers and bytes that is;
``backend="reference"`` keeps the codes alone (slow, small) and ``backend="dense"`` asks for this path
by name. W8A8 specs are not served here: quantizing the activations is part of their numbers, and the
reference path computes those as the format defines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight


def supports(qw: QuantizedWeight) -> bool:
    return qw.spec.activations is None


class DenseWeight:
    """The dequantized weight in ``dtype``, multiplied as an ordinary Linear's."""

    backend = "dense"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        self.weight = dequantize_weight(qw, dtype)

    @property
    def read_bytes(self) -> int:
        """Bytes a call reads for the weight (what a decode step streams, instead of the stored codes)."""
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
