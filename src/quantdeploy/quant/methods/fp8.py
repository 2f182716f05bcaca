"""FP8 E4M3 weights with one fp32 scale per output channel (or per group).

``activations=True`` makes it W8A8: inputs are quantized to E4M3 per token at run time (dynamic
scales, no calibration), which needs per-channel weights.
"""

from __future__ import annotations

import dataclasses

from quantdeploy.config import Config
from quantdeploy.quant.methods import register
from quantdeploy.quant.methods.rtn import round_to_nearest
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig


@dataclasses.dataclass(frozen=True)
class FP8Config(Config):
    TYPE = "fp8"
    VERSION = 1

    group_size: int | None = None
    activations: bool = False
    pin_group_size: bool = False
    targets: TargetConfig = TargetConfig()

    def validate(self) -> None:
        self.base_spec()

    def base_spec(self) -> QuantSpec:
        return QuantSpec(dtype="fp8_e4m3", group_size=self.group_size,
                         activations="fp8_e4m3" if self.activations else None)


# The grid is the whole method: the spec names it, round-to-nearest fills it.
register("fp8", FP8Config, "FP8 E4M3 weights, per-channel scales")(round_to_nearest)
