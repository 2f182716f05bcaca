"""SmoothQuant W8A8 (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models") as a calibrated method.

Activation outliers live in a few input channels; SmoothQuant moves part of that range into the
weights with per-channel scales ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (Eq. 4; ``α`` is the migration
strength), folded into the producing norm or Linear (``quant/smoothing.py``). The smoothed weights are
then quantized to int8 per output channel, and at run time each input token is quantized to int8
dynamically; the reference kernel multiplies in integers with int32 accumulation.

``max|X_j|`` is taken over every calibration token, block by block on the quantized-so-far model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.methods import register_calibrated
from quantdeploy.quant.methods.rtn import round_block_to_nearest, round_to_nearest
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.sequential import BlockRunner, capture_hooks
from quantdeploy.quant.smoothing import block_mappings, fold_scales
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """alpha: migration strength in [0, 1] (0.5 in the paper for most models)."""

    TYPE = "smoothquant"
    VERSION = 1

    alpha: float = 0.5
    calibration: CalibrationConfig = CalibrationConfig()
    targets: TargetConfig = TargetConfig()

    @property
    def pin_group_size(self) -> bool:
        return False

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")

    def base_spec(self) -> QuantSpec:
        return QuantSpec(dtype="int8", group_size=None, symmetric=True, activations="int8")


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4: ``s_j = max|X_j|^α / max_i |W_ij|^(1-α)`` over the consumers' columns, kept positive."""
    w_absmax = torch.cat([w.abs().float() for w in weights], dim=0).amax(dim=0)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _input_absmax(runner: BlockRunner, linears: dict[str, nn.Linear], names: list[str]) -> dict[str, torch.Tensor]:
    leaders = {n: linears[n] for n in names}
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        found[name] = m if name not in found else torch.maximum(found[name], m)

    with capture_hooks(leaders, keep):
        runner.run()
    return found


@register_calibrated("smoothquant", SmoothQuantConfig, "SmoothQuant W8A8: smoothed int8 weights, int8 per-token activations",
                     fallback=round_to_nearest)
def quantize_block(config: SmoothQuantConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                   runner: BlockRunner) -> dict[str, QuantizedWeight]:
    mappings = block_mappings(runner.block, linears)
    absmax = _input_absmax(runner, linears, [fulls[0] for _, fulls in mappings])
    for producer, fulls in mappings:
        consumers = [linears[f] for f in fulls]
        fold_scales(producer, consumers, smoothing_scales(absmax[fulls[0]], [c.weight for c in consumers], config.alpha))
    return round_block_to_nearest(linears, specs, runner)
