"""GPTQ as a calibrated method: collect each Linear's Hessian from calibration activations, block by
block, and solve with :func:`~quantdeploy.quant.gptq_solver.gptq_quantize`.

*True-sequential*: inside a block, Linear layers that share an input (q/k/v, gate/up) form a stage;
stages are solved in execution order, and each later stage's Hessian is collected with the earlier
stages already quantized. Each stage's pass stops as soon as its layers have seen their inputs, so the
extra passes cost a fraction of a block each. The stored result is the ordinary group-wise int layout.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.gptq_solver import gptq_quantize, hessian_update
from quantdeploy.quant.methods import register_calibrated
from quantdeploy.quant.methods.rtn import IntGridConfig, round_to_nearest
from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight, pack_affine
from quantdeploy.quant.sequential import BlockRunner, capture_hooks
from quantdeploy.quant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(IntGridConfig):
    """The integer grid of :class:`IntGridConfig`, chosen with GPTQ. act_order uses static groups;
    damp_percent is λ / mean diag(H); block_size is the lazy-batch width."""

    TYPE = "gptq"
    VERSION = 1

    act_order: bool = True
    true_sequential: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    calibration: CalibrationConfig = CalibrationConfig()

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent}")


def solve(config: GPTQConfig, weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    codes, scales, zeros = gptq_quantize(weight, H, spec.bits, spec.group_for(weight.shape[1]), spec.symmetric,
                                         act_order=config.act_order, block_size=config.block_size,
                                         damp=config.damp_percent)
    return pack_affine(codes, scales, zeros, spec)


@register_calibrated("gptq", GPTQConfig, "GPTQ: Hessian-aware rounding with error feedback (calibrated)",
                     fallback=round_to_nearest)
def quantize_block(config: GPTQConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                   runner: BlockRunner) -> dict[str, QuantizedWeight]:
    stages = runner.input_groups(linears) if config.true_sequential else [list(linears)]
    out: dict[str, QuantizedWeight] = {}
    for stage in stages:
        modules = {n: linears[n] for n in stage}
        device = next(iter(modules.values())).weight.device
        H = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in modules.items()}
        counts = dict.fromkeys(modules, 0)

        def accumulate(name: str, x: torch.Tensor) -> None:
            H[name], counts[name] = hessian_update(H[name], x, counts[name])

        with capture_hooks(modules, accumulate):
            runner.run(stop_after=modules[stage[-1]] if config.true_sequential else None)
        for name, module in modules.items():
            qw = solve(config, module.weight, H.pop(name), specs[name])
            runner.set_weight(module, dequantize_weight(qw))
            out[name] = qw
    return out
