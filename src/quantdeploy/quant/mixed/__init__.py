"""Mixed precision: a spec per layer, chosen by measured sensitivity under a bit budget.

``MixedConfig`` rides next to any method config: the method decides how codes are chosen (RTN, GPTQ,
AWQ ...), this decides which grid each layer gets. ``plan_mixed`` measures each target Linear's cost at
each candidate (``sensitivity.py``), solves the budget (``allocate.py``) and returns the per-layer specs
(layers kept in the original dtype are left out) with a record for the manifest; the pipeline then
quantizes with those specs and measures the end-to-end KLD against the prediction. The search quantizes
a layer as the method would where it can (a data-free method's own handler, GPTQ's weights for GPTQ,
AWQ's quantizer on the AWQ-scaled model, round to nearest for SmoothQuant: ``layers.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig, load_calibration
from quantdeploy.quant.mixed.allocate import Allocation, allocate
from quantdeploy.quant.mixed.layers import LayerQuantizer, OneShotGPTQ, method_handler, round_to_nearest
from quantdeploy.quant.mixed.progressive import progressive
from quantdeploy.quant.mixed.sensitivity import DEFAULT_CANDIDATES, KEEP, Sensitivity, measure
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import select_targets

log = logging.getLogger(__name__)

__all__ = ["MixedConfig", "plan_mixed", "Allocation", "Sensitivity", "KEEP"]


@dataclasses.dataclass(frozen=True)
class MixedConfig(Config):
    """Exactly one budget: bits_budget (average stored bits per weight over the target layers, scales and
    zeros counted), or an accuracy budget, max_kld and/or max_ppl_increase (a fraction: 0.02 is 2%),
    met (by the one-sided 95% upper bound) on ``validation_samples`` windows of the calibration text,
    disjoint from those the sensitivities were measured on (``progressive.py``). candidates: the specs a
    layer may get besides keeping its weight; calibration: the windows the sensitivities are measured on
    (4 of 128 tokens by default).
    pin: ``(regex, option)`` pairs fixing every target layer whose name the regex matches (``re.search``;
    the first matching pair wins) to ``option``, a candidate's description (``QuantSpec.describe``, as
    given) or ``"original"``; pinned layers are not searched, and their bits count against the budget."""

    TYPE = "mixed"
    VERSION = 1

    bits_budget: float | None = None
    max_kld: float | None = None
    max_ppl_increase: float | None = None
    candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES
    calibration: CalibrationConfig = CalibrationConfig(num_samples=4, seq_len=128)
    validation_samples: int = 32  # windows of calibration.seq_len tokens checking an accuracy budget
    pin: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        accuracy = self.max_kld is not None or self.max_ppl_increase is not None
        if (self.bits_budget is not None) == accuracy:
            raise ConfigError("mixed precision takes one budget: --bits-budget, or --max-kld / --max-ppl-increase")
        if self.bits_budget is not None and not 1.0 <= self.bits_budget <= 32.0:
            raise ConfigError(f"bits_budget must be between 1 and 32 bits per weight, got {self.bits_budget}")
        for name in ("max_kld", "max_ppl_increase"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if accuracy and self.validation_samples < 2:
            raise ConfigError(f"an accuracy budget needs at least 2 validation windows, got {self.validation_samples}")
        if not self.candidates:
            raise ConfigError("mixed precision needs at least one candidate spec")
        if any(c.activations is not None for c in self.candidates):
            raise ConfigError("mixed precision candidates are weight-only specs")
        names = [c.describe() for c in self.candidates] + [KEEP]
        for pattern, option in self.pin:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"pin '{pattern}' is not a regular expression: {err}") from None
            if option not in names:
                raise ConfigError(f"pin '{pattern}' names '{option}', which is not a candidate; choose one of "
                                  f"{', '.join(names)}")


def _options(model: nn.Module, config: Config, mixed: MixedConfig) -> dict[str, dict[str, QuantSpec]]:
    from quantdeploy.quant.apply import resolve_spec

    targets = {n: m for n, m in select_targets(model, config.targets).items() if isinstance(m, nn.Linear)}
    if not targets:
        raise ConfigError("the target selection matches no Linear layer; check --include/--exclude")
    notes: dict[int, int] = {}
    options = {}
    names = [c.describe() for c in mixed.candidates]
    for name, module in targets.items():
        specs = [resolve_spec(c, name, module.weight.shape[1], False, notes) for c in mixed.candidates]
        pin = next((option for pattern, option in mixed.pin if re.search(pattern, name)), None)
        if pin is not None:  # the one option it may take (none besides the original for KEEP)
            specs = [] if pin == KEEP else [specs[names.index(pin)]]
        options[name] = {s.describe(): s for s in specs}
    for pattern, _ in mixed.pin:
        if not any(re.search(pattern, name) for name in targets):
            raise ConfigError(f"pin '{pattern}' matches no target layer; check the regex against `quantdeploy inspect`")
    return options


def _pinned(sens: Sensitivity, options: dict[str, dict[str, QuantSpec]], mixed: MixedConfig) -> None:
    """A layer pinned to a spec may not keep its original weight: drop that option from its choices."""
    for name, opts in options.items():
        if any(re.search(p, name) for p, o in mixed.pin) and opts:
            del sens.cost[name][KEEP], sens.bits[name][KEEP]


def windows(tokenizer, mixed: MixedConfig) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(the sensitivity windows, the validation windows: none under a bit budget) of the calibration text."""
    validation = mixed.validation_samples if mixed.bits_budget is None else 0
    calib = mixed.calibration.replace(num_samples=mixed.calibration.num_samples + validation)
    tokens = load_calibration(tokenizer, calib, needed_by="mixed precision").tokens
    return tokens[: mixed.calibration.num_samples], tokens[mixed.calibration.num_samples:]


def layer_quantizer(model: nn.Module, tokenizer, config: Config,  # noqa: ANN001
                    names: list[str]) -> tuple[nn.Module, LayerQuantizer]:
    """The model the search measures layers on and its ``LayerQuantizer`` for ``config``'s method: a
    data-free method's own handler; GPTQ's weights for plain GPTQ (its calibration windows give the
    Hessians); for AWQ, a copy of the model with AWQ's scales folded in (the same function in floating
    point, searched for the method's base spec), quantized per layer by its quantizer: GPTQ's weights,
    or round to nearest with the clip search (the copy holds a second model in memory while the search
    runs); round to nearest for SmoothQuant, whose scaling is not in the search."""
    import copy

    from quantdeploy.device import default_device
    from quantdeploy.quant.apply import plan
    from quantdeploy.quant.methods import method_for_config
    from quantdeploy.quant.methods.awq import AWQConfig, fold_awq_scales
    from quantdeploy.quant.methods.gptq import GPTQConfig

    if isinstance(config, GPTQConfig):
        tokens = load_calibration(tokenizer, config.calibration, needed_by="GPTQ").tokens
        return model, OneShotGPTQ(model, tokens, names, config)
    if isinstance(config, AWQConfig):  # its quantizer runs on AWQ's calibration windows, as in the method
        scaled = copy.deepcopy(model)
        tokens = load_calibration(tokenizer, config.calibration, needed_by="AWQ").tokens
        fold_awq_scales(config, scaled, plan(scaled, config), tokens, default_device())
        quantize = (OneShotGPTQ(scaled, tokens, names, config.quantizer) if isinstance(config.quantizer, GPTQConfig)
                    else round_to_nearest(config.quantizer.clip_search))
        quantize.description = f"AWQ's scales, then {quantize.description}"
        return scaled, quantize
    if not method_for_config(config).calibrated:
        return model, method_handler(config)
    return model, round_to_nearest(bool(getattr(config, "clip_search", True)))


def plan_mixed(model: nn.Module, tokenizer, config: Config, mixed: MixedConfig,
               progress=None) -> tuple[dict[str, QuantSpec], dict]:  # noqa: ANN001
    """Per-layer specs for ``config``'s targets under ``mixed``'s budget and the manifest's record."""
    options = _options(model, config, mixed)  # user errors before the calibration data is read
    accuracy = mixed.bits_budget is None
    sensitivity_windows, validation = windows(tokenizer, mixed)
    model, quantize = layer_quantizer(model, tokenizer, config, list(options))
    log.info("mixed precision: layers quantized by %s in the search", quantize.description)
    sens = measure(model, sensitivity_windows, options, progress=progress, quantize=quantize)
    _pinned(sens, options, mixed)
    record: dict = {"config": mixed.to_dict(), "layer_quantizer": quantize.description}
    if accuracy:
        if validation.shape[0] < 2:
            raise ConfigError("the calibration text holds too few windows for a validation split; give more text")
        result = progressive(model, sens, validation, mixed.max_kld, mixed.max_ppl_increase, quantize=quantize)
        choice = result.choice
        record["progressive"] = result.to_dict()
        log.info("mixed precision: %.3f bits per weight, validation KLD %.4f (95%% bound %.4f), perplexity %+.2f%% "
                 "(path: %s)", result.average_bits, result.measured_kld, result.kld_bound, 100 * result.ppl_increase,
                 ", ".join(f"{p['average_bits']:.2f} bits: {p['kld']:.4f}" for p in result.path))
    else:
        alloc = allocate(sens, mixed.bits_budget)
        choice = alloc.choice
        record["allocation"] = alloc.to_dict()
        log.info("mixed precision: %.3f bits per weight (budget %.3f), predicted KLD %.4f",
                 alloc.average_bits, mixed.bits_budget, alloc.predicted_kld)
    counts: dict[str, int] = {}
    for o in choice.values():
        counts[o] = counts.get(o, 0) + 1
    record["layers_per_option"] = counts
    record["sensitivity"] = sens.to_dict()
    return {n: options[n][o] for n, o in choice.items() if o != KEEP}, record
