"""Round-to-nearest onto an integer grid: INT8 per-channel, INT4/INT3/INT2 group-wise, (a)symmetric.

The baseline every calibrated method is compared against: each weight goes to the nearest grid point
of its group's affine grid (``primitives.quantize_weight``). No data needed.
"""

from __future__ import annotations

import dataclasses

import torch

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.methods import register
from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig


def default_group_size(bits: int) -> int | None:
    """The group size a width gets when none is given: per channel (None) for int8, else 128."""
    return None if bits == 8 else 128


@dataclasses.dataclass(frozen=True)
class IntGridConfig(Config):
    """The integer-grid settings that RTN and GPTQ share.

    bits in {2, 3, 4, 8}; group_size None is per output channel, "auto" (the default) is what each width
    is used with in the field: per channel for int8 (one scale per row costs nothing at 8 bits, and the
    CPU and GPU int8 kernels want it), groups of 128 below (GPTQ's and AutoAWQ's default). The config
    stores the resolved size. pin_group_size: fail when a layer's input size does not divide by
    ``group_size`` instead of using the largest group that fits (the CLI pins a size the user typed).
    clip_search: each group's range is the shrink with the least rounding error weighted by w²
    (``primitives.choose_qparams``) rather than its whole span; "auto" (the default) is on below 8 bits,
    where it paid on the bundled model, and off at 8 bits, where it changed nothing measurable (mean KLD
    0.0032 either way) and costs forty passes over the weights. Format 2 added it and the full symmetric
    grid; a version-1 config reads as ``clip_search=False``.
    """

    bits: int = 4
    group_size: int | None | str = "auto"
    symmetric: bool = True
    pin_group_size: bool = False
    clip_search: bool | str = "auto"
    targets: TargetConfig = TargetConfig()

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return {"clip_search": False, **data} if version < 2 else data

    def __post_init__(self) -> None:
        if self.group_size == "auto":
            object.__setattr__(self, "group_size", default_group_size(self.bits))
        if self.clip_search == "auto":
            object.__setattr__(self, "clip_search", self.bits < 8)
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"{self.TYPE} clip_search must be true, false or 'auto', got {self.clip_search!r}")
        if isinstance(self.group_size, str) or isinstance(self.group_size, bool):
            raise ConfigError(f"{self.TYPE} group_size must be a positive integer, null (per channel) or 'auto', "
                              f"got {self.group_size!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"{self.TYPE} supports 2, 3, 4 or 8 bits, got {self.bits}")
        self.base_spec()

    def base_spec(self) -> QuantSpec:
        return QuantSpec(dtype=f"int{self.bits}", group_size=self.group_size, symmetric=self.symmetric)


@dataclasses.dataclass(frozen=True)
class RTNConfig(IntGridConfig):
    """Round-to-nearest onto the integer grid (the fields of :class:`IntGridConfig`)."""

    TYPE = "rtn"
    VERSION = 2


@register("rtn", RTNConfig, "round-to-nearest integer grid (int8/int4/int3/int2)")
def round_to_nearest(config: Config, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Each weight to the nearest point of the grid ``spec`` names (no data, no error feedback)."""
    return quantize_weight(weight, spec, getattr(config, "clip_search", False))


def round_block_to_nearest(linears: dict, specs: dict[str, QuantSpec], runner, clip_search: bool = False) -> dict[str, QuantizedWeight]:
    """Round a calibrated block's (already transformed) Linear weights to nearest, and put the
    fake-quantized weights in place so the next blocks are calibrated on the quantized model."""
    out = {}
    for name, linear in linears.items():
        qw = quantize_weight(linear.weight.data, specs[name], clip_search)
        runner.set_weight(linear, dequantize_weight(qw))
        out[name] = qw
    return out
