"""Mixed precision: a spec per layer, chosen by measured sensitivity under a bit budget.

``MixedConfig`` rides next to any method config: the method decides how codes are chosen (RTN, GPTQ,
AWQ ...), this decides which grid each layer gets. ``plan_mixed`` measures each target Linear's cost at
each candidate (``sensitivity.py``), solves the budget (``allocate.py``) and returns the per-layer specs
(layers kept in the original dtype are left out) with a record for the manifest; the pipeline then
quantizes with those specs and measures the end-to-end KLD against the prediction.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig, load_calibration
from quantdeploy.quant.mixed.allocate import Allocation, allocate
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
    met on validation windows the sensitivities did not see (``progressive.py``). candidates: the specs a
    layer may get besides keeping its weight; calibration: the windows the sensitivities are measured on
    (4 of 128 tokens by default; an accuracy budget draws as many again, disjoint, for validation)."""

    TYPE = "mixed"
    VERSION = 1

    bits_budget: float | None = None
    max_kld: float | None = None
    max_ppl_increase: float | None = None
    candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES
    calibration: CalibrationConfig = CalibrationConfig(num_samples=4, seq_len=128)

    def validate(self) -> None:
        accuracy = self.max_kld is not None or self.max_ppl_increase is not None
        if (self.bits_budget is not None) == accuracy:
            raise ConfigError("mixed precision takes one budget: --bits-budget, or --max-kld / --max-ppl-increase")
        if self.bits_budget is not None and not 1.0 <= self.bits_budget <= 32.0:
            raise ConfigError(f"bits_budget must be between 1 and 32 bits per weight, got {self.bits_budget}")
        for name in ("max_kld", "max_ppl_increase"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.candidates:
            raise ConfigError("mixed precision needs at least one candidate spec")
        if any(c.activations is not None for c in self.candidates):
            raise ConfigError("mixed precision candidates are weight-only specs")


def _options(model: nn.Module, config: Config, mixed: MixedConfig) -> dict[str, dict[str, QuantSpec]]:
    from quantdeploy.quant.apply import resolve_spec

    targets = {n: m for n, m in select_targets(model, config.targets).items() if isinstance(m, nn.Linear)}
    if not targets:
        raise ConfigError("the target selection matches no Linear layer; check --include/--exclude")
    notes: dict[int, int] = {}
    options = {}
    for name, module in targets.items():
        specs = [resolve_spec(c, name, module.weight.shape[1], False, notes) for c in mixed.candidates]
        options[name] = {s.describe(): s for s in specs}
    return options


def plan_mixed(model: nn.Module, tokenizer, config: Config, mixed: MixedConfig,
               progress=None) -> tuple[dict[str, QuantSpec], dict]:  # noqa: ANN001
    """Per-layer specs for ``config``'s targets under ``mixed``'s budget and the manifest's record."""
    options = _options(model, config, mixed)  # user errors before the calibration data is read
    accuracy = mixed.bits_budget is None
    calib = mixed.calibration.replace(num_samples=mixed.calibration.num_samples * (2 if accuracy else 1))
    tokens = load_calibration(tokenizer, calib, needed_by="mixed precision").tokens
    sensitivity_windows = tokens[: mixed.calibration.num_samples]
    clip_search = bool(getattr(config, "clip_search", True))
    sens = measure(model, sensitivity_windows, options, clip_search=clip_search, progress=progress)
    record: dict = {"config": mixed.to_dict()}
    if accuracy:
        validation = tokens[mixed.calibration.num_samples:]
        if validation.shape[0] == 0:
            raise ConfigError("the calibration text holds too few windows for a validation split; give more text")
        result = progressive(model, sens, validation, mixed.max_kld, mixed.max_ppl_increase, clip_search)
        choice = result.choice
        record["progressive"] = result.to_dict()
        log.info("mixed precision: %.3f bits per weight, validation KLD %.4f, perplexity %+.2f%% (path: %s)",
                 result.average_bits, result.measured_kld, 100 * result.ppl_increase,
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
