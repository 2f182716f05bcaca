"""NF4 with double quantization (QLoRA), as a weight-only method. The math is in ``quant/nf4.py``."""

from __future__ import annotations

import dataclasses

from quantdeploy.config import Config
from quantdeploy.quant.methods import register
from quantdeploy.quant.methods.rtn import round_to_nearest
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig


@dataclasses.dataclass(frozen=True)
class NF4Config(Config):
    """group_size 64 and double quantization on, the QLoRA defaults."""

    TYPE = "nf4"
    VERSION = 1

    group_size: int | None = 64
    double_quant: bool = True
    pin_group_size: bool = False
    targets: TargetConfig = TargetConfig()

    def validate(self) -> None:
        self.base_spec()

    def base_spec(self) -> QuantSpec:
        return QuantSpec(dtype="nf4", group_size=self.group_size, double_quant=self.double_quant)


# The grid is the whole method: the spec names it, round-to-nearest fills it.
register("nf4", NF4Config, "NormalFloat4 with double-quantized scales (QLoRA)")(round_to_nearest)
