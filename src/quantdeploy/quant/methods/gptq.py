"""GPTQ as a calibrated method: collect each Linear's Hessian from calibration activations, block by
block, and solve with :func:`~quantdeploy.quant.gptq_solver.gptq_quantize`.

*True-sequential*: inside a block, Linear layers that share an input (q/k/v, gate/up) form a stage;
stages are solved in execution order, and each later stage's Hessian is collected with the earlier
stages already quantized. Layers of a stage read the same input and share one Hessian, and each stage's
pass stops just before that stage's layers would run, so the extra passes cost a fraction of a block. The stored result is the ordinary group-wise int layout.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.gptq_solver import PreparedHessian, gptq_quantize, hessian_update, prepare_hessian
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
    VERSION = 2

    act_order: bool = True
    true_sequential: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    calibration: CalibrationConfig = CalibrationConfig()

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent}")


def solve(config: GPTQConfig, weights: list[torch.Tensor], H: torch.Tensor | PreparedHessian,
          spec: QuantSpec) -> list[QuantizedWeight]:
    """GPTQ for layers that read the same input (same ``H``) and share ``spec``, solved as one stacked
    matrix: GPTQ treats rows independently, so stacking changes nothing but the number of column steps
    (one pass over the columns for q/k/v instead of three)."""
    rows = [w.shape[0] for w in weights]
    W = torch.cat(weights) if len(weights) > 1 else weights[0]
    codes, scales, zeros = gptq_quantize(W, H, spec.bits, spec.group_for(W.shape[1]), spec.symmetric,
                                         act_order=config.act_order, block_size=config.block_size,
                                         damp=config.damp_percent, clip_search=config.clip_search)
    return [pack_affine(c, s, z, spec) for c, s, z in zip(codes.split(rows), scales.split(rows), zeros.split(rows))]


@register_calibrated("gptq", GPTQConfig, "GPTQ: Hessian-aware rounding with error feedback (calibrated)",
                     fallback=round_to_nearest)
def quantize_block(config: GPTQConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                   runner: BlockRunner) -> dict[str, QuantizedWeight]:
    groups = runner.input_groups(linears)  # layers that read the same input share one Hessian
    stages = groups if config.true_sequential else [[n for g in groups for n in g]]
    out: dict[str, QuantizedWeight] = {}
    for stage in stages:
        leaders = [g[0] for g in groups if g[0] in stage]
        device = linears[leaders[0]].weight.device
        H = {n: torch.zeros(linears[n].in_features, linears[n].in_features, device=device) for n in leaders}
        counts = dict.fromkeys(leaders, 0)

        def accumulate(name: str, x: torch.Tensor) -> None:
            H[name], counts[name] = hessian_update(H[name], x, counts[name])

        with capture_hooks({n: linears[n] for n in leaders}, accumulate):
            runner.run(stop_before=linears[leaders[-1]])  # the last input needed is captured, then stop
        for group in (g for g in groups if g[0] in stage):
            hessian = prepare_hessian(H.pop(group[0]), config.act_order, config.damp_percent)
            same_spec = all(specs[n] == specs[group[0]] for n in group)
            for names in [group] if same_spec else [[n] for n in group]:
                solved = solve(config, [linears[n].weight for n in names], hessian, specs[names[0]])
                for name, qw in zip(names, solved):
                    runner.set_weight(linears[name], dequantize_weight(qw))
                    out[name] = qw
    return out
