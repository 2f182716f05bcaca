"""AWQ as a calibrated transform before a quantizer (round-to-nearest or GPTQ), block by block.

For each mapping (producer → the Linear layers reading its output) the scale search of
``awq_search.py`` picks per-channel scales; ``1/s`` is folded into the producer (an RMSNorm/LayerNorm
weight, or a Linear's output rows) and ``s`` into the consumers' input columns, so the float model is
unchanged. Then each Linear's clipping range is searched (q/k excepted, as in the reference
implementation: attention logits are sensitive to their extremes), and the configured quantizer
quantizes the scaled, clipped weights. The transform edits the model it is given; the pipeline hands
it a copy.

Mappings and folding are shared with SmoothQuant (``quant/smoothing.py``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.awq_search import apply_clip, scale_gram, search_clip, search_scales
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.methods import gptq, register_calibrated
from quantdeploy.quant.methods.gptq import GPTQConfig
from quantdeploy.quant.methods.rtn import RTNConfig, round_block_to_nearest, round_to_nearest
from quantdeploy.quant.primitives import QuantizedWeight, fake_quantize
from quantdeploy.quant.sequential import BlockRunner, capture_hooks, run_sequential
from quantdeploy.quant.smoothing import block_mappings, fold_scales
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig

log = logging.getLogger(__name__)

NO_CLIP = ("q_proj", "k_proj")


@dataclasses.dataclass(frozen=True)
class AWQConfig(Config):
    """AWQ scaling (and clipping) followed by ``quantizer``, which sets bits, groups and targets."""

    TYPE = "awq"
    VERSION = 1

    quantizer: RTNConfig | GPTQConfig = RTNConfig(bits=4, group_size=128)
    n_grid: int = 20
    clip: bool = True
    calibration: CalibrationConfig = CalibrationConfig()

    def validate(self) -> None:
        if not isinstance(self.quantizer, (RTNConfig, GPTQConfig)):
            raise ConfigError("awq's quantizer must be an rtn or gptq config")
        if self.n_grid < 2:
            raise ConfigError(f"n_grid must be at least 2, got {self.n_grid}")

    @property
    def targets(self) -> TargetConfig:
        return self.quantizer.targets

    @property
    def pin_group_size(self) -> bool:
        return self.quantizer.pin_group_size

    def base_spec(self) -> QuantSpec:
        return self.quantizer.base_spec()


def fake_quant(spec: QuantSpec):
    return lambda w: fake_quantize(w, spec)


def _capture_stats(runner: BlockRunner, linears: dict[str, nn.Linear]) -> dict[str, dict[str, torch.Tensor]]:
    """Gram matrix ``XᵀX/n`` and mean ``|X|`` of each Linear's input over all calibration tokens, in one
    pass; layers that share an input share one entry."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    leaders: dict[str, nn.Linear] = {}
    for group in runner.input_groups(linears):
        entry = {"G": None, "absmean": None, "n": 0}
        for name in group:
            stats[name] = entry
        leaders[group[0]] = linears[group[0]]

    def accumulate(name: str, x: torch.Tensor) -> None:
        entry = stats[name]
        x = x.reshape(-1, x.shape[-1]).float()
        if entry["G"] is None:
            entry["G"] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            entry["absmean"] = torch.zeros(x.shape[1], device=x.device)
        total = entry["n"] + x.shape[0]
        entry["G"].mul_(entry["n"] / total).addmm_(x.T, x, alpha=1.0 / total)
        entry["absmean"].mul_(entry["n"] / total).add_(x.abs().sum(dim=0) / total)
        entry["n"] = total

    with capture_hooks(leaders, accumulate):
        runner.run(stop_before=list(leaders.values())[-1])
    return stats


def _fold_block_scales(config: AWQConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                       runner: BlockRunner) -> dict[str, dict[str, torch.Tensor]]:
    """Search and fold one block's scales (the float block computes the same function after); returns
    the input statistics, rescaled to what the consumers now read."""
    stats = _capture_stats(runner, linears)
    for mapping in block_mappings(runner.block, linears):
        producer, fulls = mapping.producer, mapping.consumers
        consumers = [linears[f] for f in fulls]
        spec, entry = specs[fulls[0]], stats[fulls[0]]
        s, err = search_scales(entry["G"], entry["absmean"], [c.weight for c in consumers], fake_quant(spec),
                               spec.group_for(consumers[0].in_features), config.n_grid)
        fold_scales(producer, consumers, s)
        entry["G"] = scale_gram(entry["G"], s)  # the consumers now read X / s
        entry["absmean"] = entry["absmean"] / s
        log.debug("AWQ -> %s: relative output error %.3g", fulls, err)
    return stats


@torch.no_grad()
def fold_awq_scales(config: AWQConfig, model: nn.Module, specs: dict[str, QuantSpec], tokens: torch.Tensor,
                    device: torch.device) -> None:
    """AWQ's scales alone, searched for ``specs`` on the float model's own activations and folded into
    ``model`` in place: no clipping, no quantization, so the float model computes the same function.
    The mixed-precision search measures layers on such a model (``quant/mixed/layers.py``)."""
    def per_block(index: int, block_name: str, block: nn.Module, runner: BlockRunner) -> None:
        mine = {n: s for n, s in specs.items() if n.startswith(block_name + ".")}
        if mine:
            _fold_block_scales(config, {n: model.get_submodule(n) for n in mine}, mine, runner)

    run_sequential(model, tokens, device, batch_size=1, per_block=per_block)


@register_calibrated("awq", AWQConfig, "AWQ: activation-aware scaling and clipping, then RTN or GPTQ (calibrated)",
                     fallback=round_to_nearest)
def quantize_block(config: AWQConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                   runner: BlockRunner) -> dict[str, QuantizedWeight]:
    stats = _fold_block_scales(config, linears, specs, runner)
    if config.clip:
        for full, linear in linears.items():
            if full.endswith(NO_CLIP):
                continue
            spec = specs[full]
            group = spec.group_for(linear.in_features)
            max_val = search_clip(stats[full]["G"], linear.weight.data, fake_quant(spec), group, config.n_grid)
            linear.weight.data = apply_clip(linear.weight.data, max_val, group)
    del stats

    if isinstance(config.quantizer, GPTQConfig):
        return gptq.quantize_block(config.quantizer, linears, specs, runner)
    return round_block_to_nearest(linears, specs, runner, config.quantizer.clip_search)
