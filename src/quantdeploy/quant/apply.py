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
from quantdeploy.device import default_device
from quantdeploy.quant.calibration import load_calibration
from quantdeploy.quant.methods import method_for_config
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.spec import QuantSpec, fit_group_size
from quantdeploy.quant.sequential import BlockRunner, run_sequential
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
def quantize_weights(model: nn.Module, config: Config, progress: Progress | None = None, tokenizer=None,
                     device: torch.device | None = None,
                     specs: dict[str, QuantSpec] | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize every planned module's weight (or each of ``specs``, a per-layer plan such as mixed
    precision chooses); returns the weights and a record for the manifest (the calibration data's hash
    and sample count for calibrated methods)."""
    method = method_for_config(config)
    if method.calibrated:  # bad calibration data is reported before any planning or work
        if tokenizer is None:
            raise ConfigError(f"method '{method.name}' needs calibration data, and so a tokenizer")
        calib = load_calibration(tokenizer, config.calibration)
        specs = plan(model, config) if specs is None else specs
        return _quantize_calibrated(model, config, specs, method, calib, progress, device)
    specs = plan(model, config) if specs is None else specs
    out: dict[str, QuantizedWeight] = {}
    for i, (name, spec) in enumerate(specs.items()):
        out[name] = method.handler(config, name, model.get_submodule(name).weight, spec)
        if progress:
            progress(i + 1, len(specs), name)
    return out, {}


def _quantize_calibrated(model, config, specs, method, calib, progress, device):
    device = device or default_device()
    out: dict[str, QuantizedWeight] = {}

    def per_block(index: int, block_name: str, block: nn.Module, runner: BlockRunner) -> None:
        mine = {n: s for n, s in specs.items() if n.startswith(block_name + ".")}
        if mine:
            linears = {n: model.get_submodule(n) for n in mine}
            out.update(method.block_handler(config, linears, mine, runner))

    run_sequential(model, calib.tokens, device, batch_size=1, per_block=per_block, progress=progress)
    for name, spec in specs.items():  # targets outside the blocks (an lm_head asked for) see no block inputs
        if name not in out:
            log.info("%s is outside the decoder blocks: quantized with round-to-nearest", name)
            out[name] = method.handler(config, name, model.get_submodule(name).weight, spec)
    return {n: out[n] for n in specs}, {"calibration": calib.record(), "calibration_sha256": calib.sha256}
