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
from quantdeploy.quant.mixed.sensitivity import DEFAULT_CANDIDATES, KEEP, Sensitivity, measure
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import select_targets

log = logging.getLogger(__name__)

__all__ = ["MixedConfig", "plan_mixed", "Allocation", "Sensitivity", "KEEP"]


@dataclasses.dataclass(frozen=True)
class MixedConfig(Config):
    """bits_budget: average stored bits per weight over the target layers (scales and zeros counted);
    candidates: the specs a layer may get besides keeping its weight; calibration: the windows the
    sensitivities are measured on (4 windows of 128 tokens by default)."""

    TYPE = "mixed"
    VERSION = 1

    bits_budget: float = 4.5
    candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES
    calibration: CalibrationConfig = CalibrationConfig(num_samples=4, seq_len=128)

    def validate(self) -> None:
        if not 1.0 <= self.bits_budget <= 32.0:
            raise ConfigError(f"bits_budget must be between 1 and 32 bits per weight, got {self.bits_budget}")
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
    """Per-layer specs for ``config``'s targets under ``mixed.bits_budget`` and the manifest's record."""
    options = _options(model, config, mixed)  # user errors before the calibration data is read
    tokens = load_calibration(tokenizer, mixed.calibration, needed_by="mixed precision").tokens
    sens = measure(model, tokens, options, clip_search=bool(getattr(config, "clip_search", True)), progress=progress)
    alloc = allocate(sens, mixed.bits_budget)
    specs = {n: options[n][o] for n, o in alloc.choice.items() if o != KEEP}
    counts: dict[str, int] = {}
    for o in alloc.choice.values():
        counts[o] = counts.get(o, 0) + 1
    log.info("mixed precision: %.3f bits per weight (budget %.3f), predicted KLD %.4f; layers per option: %s",
             alloc.average_bits, mixed.bits_budget, alloc.predicted_kld, counts)
    record = {"config": mixed.to_dict(), "allocation": alloc.to_dict(), "layers_per_option": counts,
              "sensitivity": sens.to_dict()}
    return specs, record
