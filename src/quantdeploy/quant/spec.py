"""QuantSpec: how one weight matrix is represented after quantization.

A spec is per module, so mixed precision is just a different spec per layer. It names the number
format (``dtype``), the grouping along the input dimension and whether integer grids are symmetric.
Methods (RTN, GPTQ, ...) decide *how* codes are chosen; the spec only says *what* is stored.
This module does no tensor math.
"""

from __future__ import annotations

import dataclasses

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError

#: Storage bits per weight code for each supported number format.
DTYPE_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "nf4": 4, "fp8_e4m3": 8}
INT_DTYPES = ("int2", "int3", "int4", "int8")


@dataclasses.dataclass(frozen=True)
class QuantSpec(Config):
    """What is stored for one quantized weight of shape ``[out_features, in_features]``.

    dtype:        int2/int3/int4/int8 (affine integer grid), nf4 (QLoRA NormalFloat4) or fp8_e4m3.
    group_size:   weights along the input dimension that share one scale; ``None`` is per output
                  channel (one group spanning the whole row).
    symmetric:    integer grids only: zero point fixed at the middle code (no ``zeros`` tensor).
    float_zeros:  asymmetric integer grids only: the zero point of each group is a real number stored in
                  fp16 (the grid of HQQ and of llama.cpp's Q4_1 ``d·q + m``), not an integer code, so 0
                  need not be a grid point. Written by the ``halfquad`` method (format 2 of this spec).
    double_quant: nf4 only: the per-group absmax scales are themselves quantized to 8 bits
                  (blocks of 256, bitsandbytes' dynamic map), as in QLoRA.
    activations:  None (weight-only), or "int8" / "fp8_e4m3": inputs are quantized dynamically per
                  token at run time (W8A8), with per-channel weights of the same format.
    """

    TYPE = "quant_spec"
    VERSION = 2

    dtype: str = "int4"
    group_size: int | None = 128
    symmetric: bool = True
    float_zeros: bool = False
    double_quant: bool = False
    activations: str | None = None

    def validate(self) -> None:
        if self.activations is not None:
            if self.activations not in ("int8", "fp8_e4m3"):
                raise ConfigError(f"activations must be int8 or fp8_e4m3, got {self.activations!r}")
            if self.dtype != self.activations or self.group_size is not None or not self.symmetric:
                raise ConfigError(f"{self.activations} activations need symmetric per-channel {self.activations} weights")
        if self.dtype not in DTYPE_BITS:
            raise ConfigError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPE_BITS)}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ConfigError(f"group size {self.group_size} must be a positive multiple of 8 (or per-channel)")
        if self.double_quant and self.dtype != "nf4":
            raise ConfigError("double_quant applies to nf4 only")
        if not self.symmetric and self.dtype not in INT_DTYPES:
            raise ConfigError(f"{self.dtype} is symmetric by construction; --asym applies to integer dtypes")
        if self.float_zeros and (self.symmetric or self.dtype not in INT_DTYPES):
            raise ConfigError("float zero points apply to asymmetric integer grids only")

    @property
    def bits(self) -> int:
        return DTYPE_BITS[self.dtype]

    @property
    def granularity(self) -> str:
        return "channel" if self.group_size is None else "group"

    def group_for(self, in_features: int) -> int:
        """The concrete group length for a row of ``in_features`` weights."""
        return in_features if self.group_size is None else self.group_size

    def describe(self) -> str:
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        sym = "" if self.dtype not in INT_DTYPES else ("-sym" if self.symmetric else "-asym")
        sym += "-fz" if self.float_zeros else ""
        dq = "-dq" if self.double_quant else ""
        act = "-a8" if self.activations else ""
        return f"{self.dtype}{sym}-{group}{dq}{act}"


def fit_group_size(in_features: int, requested: int) -> int | None:
    """Largest multiple of 8 that divides ``in_features`` and is at most ``requested``; None if none."""
    for g in range(min(requested, in_features) // 8 * 8, 7, -8):
        if in_features % g == 0:
            return g
    return None
