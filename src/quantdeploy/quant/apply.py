"""Apply a method config to a model's weights: plan the per-module specs, then quantize each weight.

Two steps, so that every user error (a pinned group size that does not fit, a layer that cannot be
packed) surfaces before any work is done or anything is written:

1. :func:`plan` selects the target modules and resolves one concrete :class:`QuantSpec` per module.
2. :func:`quantize_weights` runs the method's handler on each planned module's weight.

The result is a plain ``{name: QuantizedWeight}``; swapping modules in a model is the caller's job
(``quantdeploy.pipeline``), so this package never imports the engine.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.methods import method_for_config
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.spec import QuantSpec, fit_group_size
from quantdeploy.quant.targets import select_targets

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def resolve_spec(base: QuantSpec, name: str, in_features: int, pinned: bool, notes: dict[int, int]) -> QuantSpec:
    """``base`` with a group size that divides ``in_features``; fit a smaller one unless pinned."""
    if in_features % 8:
        raise ConfigError(
            f"{name} has {in_features} input features, not a multiple of 8, so it cannot be packed; "
            f"leave it out with --exclude {name}"
        )
    if base.group_size is None or in_features % base.group_size == 0:
        return base
    if pinned:
        options = [str(g) for g in (32, 64, 96, 128, 192, 256) if in_features % g == 0]
        hint = f"a divisor ({', '.join(options)}) or" if options else ""
        raise ConfigError(
            f"group size {base.group_size} does not divide the {in_features} input features of {name}; "
            f"use {hint} per-channel (--group-size 0), or omit --group-size to let quantdeploy choose"
        )
    fitted = fit_group_size(in_features, base.group_size)
    if in_features not in notes:
        notes[in_features] = fitted or in_features
        log.info("group size %d does not divide %d input features (%s and others like it): using %s",
                 base.group_size, in_features, name, fitted or "per-channel")
    return base.replace(group_size=fitted)


def plan(model: nn.Module, config: Config) -> dict[str, QuantSpec]:
    """One concrete spec per target module, in model order. Raises ConfigError before any work."""
    method_for_config(config)  # fail early on a config that is not a method
    targets = select_targets(model, config.targets)
    if not targets:
        raise ConfigError("the target selection matches no Linear layer; check --include/--exclude")
    base = config.base_spec()
    notes: dict[int, int] = {}
    return {
        name: resolve_spec(base, name, module.weight.shape[1], config.pin_group_size, notes)
        for name, module in targets.items()
    }


@torch.no_grad()
def quantize_weights(model: nn.Module, config: Config, progress: Progress | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every planned module's weight with the config's method handler."""
    specs = plan(model, config)
    handler = method_for_config(config).handler
    out: dict[str, QuantizedWeight] = {}
    for i, (name, spec) in enumerate(specs.items()):
        weight = model.get_submodule(name).weight
        out[name] = handler(config, name, weight, spec)
        if progress:
            progress(i + 1, len(specs), name)
    return out
