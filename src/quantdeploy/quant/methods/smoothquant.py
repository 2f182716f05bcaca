"""SmoothQuant W8A8 (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models") as a calibrated method.

Activation outliers live in a few input channels; SmoothQuant moves part of that range into the
weights with per-channel scales ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (Eq. 4; ``α`` is the migration
strength), folded into the producing norm or Linear (``quant/smoothing.py``). The smoothed weights are
then quantized to int8 per output channel (round-to-nearest, or GPTQ: ``smoothquant+gptq``), and at
run time each input token is quantized to int8 dynamically; the reference kernel multiplies in integers with int32 accumulation.

``max|X_j|`` is taken over every calibration token, block by block on the quantized-so-far model.

One global ``α`` rarely suits every layer: SwiGLU's ``down_proj`` input has far larger outliers than
the attention inputs. With ``alpha=None`` (the default) ``α`` is searched per mapping over
``alpha_grid``, choosing the one that minimises the consumers' output error under W8A8 fake
quantization, ``Σ‖X Wᵀ − Q_tok(X/s) Q_ch(W·s)ᵀ‖²``, on up to ``search_tokens`` calibration tokens
(the per-layer search of later SmoothQuant implementations such as Intel Neural Compressor's
``auto`` alpha). Unlike AWQ's weight-only search this cannot go through the Gram matrix: the
activation rounding depends on each token.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.calibration import CalibrationConfig
from quantdeploy.quant.methods import gptq, register_calibrated
from quantdeploy.quant.methods.gptq import GPTQConfig
from quantdeploy.quant.methods.rtn import RTNConfig, round_block_to_nearest, round_to_nearest
from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight, quantize_activations, quantize_weight
from quantdeploy.quant.sequential import BlockRunner, capture_hooks
from quantdeploy.quant.smoothing import Mapping, block_mappings, fold_scales
from quantdeploy.quant.spec import QuantSpec
from quantdeploy.quant.targets import TargetConfig

log = logging.getLogger(__name__)
INT8 = QuantSpec(dtype="int8", group_size=None, symmetric=True)


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """alpha: migration strength in [0, 1] (0.5 in the paper for most models), or None to search it per
    mapping over ``alpha_grid`` on ``search_tokens`` calibration tokens. ``quantizer`` rounds the
    smoothed weights to int8 per channel (symmetric): round-to-nearest, or GPTQ as in llm-compressor's
    W8A8 recipe; it also holds the targets."""

    TYPE = "smoothquant"
    VERSION = 2

    alpha: float | None = None
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(4, 20))  # 0.20 … 0.95
    search_tokens: int = 2048
    quantizer: RTNConfig | GPTQConfig = RTNConfig(bits=8, group_size=None)
    calibration: CalibrationConfig = CalibrationConfig()

    @property
    def targets(self) -> TargetConfig:
        return self.quantizer.targets

    @property
    def pin_group_size(self) -> bool:
        return False

    def validate(self) -> None:
        for a in (self.alpha,) if self.alpha is not None else self.alpha_grid:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"smoothquant alpha must be in [0, 1], got {a}")
        if self.alpha is None and (not self.alpha_grid or self.search_tokens < 1):
            raise ConfigError("smoothquant alpha search needs a non-empty alpha_grid and search_tokens >= 1")
        q = self.quantizer
        if not isinstance(q, (RTNConfig, GPTQConfig)) or (q.bits, q.group_size, q.symmetric) != (8, None, True):
            raise ConfigError("smoothquant's quantizer must be rtn or gptq with bits 8, group_size null (per "
                              "channel) and symmetric: the int8 kernel multiplies int8 by int8")

    def base_spec(self) -> QuantSpec:
        return dataclasses.replace(self.quantizer.base_spec(), activations="int8")


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """``max_i |W_ij|`` over the rows of all consumers, per input column ``j``."""
    return torch.cat([w.abs().float() for w in weights], dim=0).amax(dim=0)


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: ``s_j = max|X_j|^α / max_i |W_ij|^(1-α)``, kept positive."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """``Σ_W ‖x Wᵀ − Q_tok(x/s) Q_ch(W·s)ᵀ‖²``: the output error the smoothed W8A8 layers leave on ``x``."""
    xq, xs = quantize_activations(x / s, "int8")
    xq = xq.float() * xs
    err = 0.0
    for w in weights:
        w = w.float()
        wq = dequantize_weight(quantize_weight(w * s, INT8))
        err += float((x @ w.T - xq @ wq.T).pow(2).sum())
    return err


def search_alpha(x: torch.Tensor, mapping: Mapping, x_absmax: torch.Tensor, weights: list[torch.Tensor],
                 grid: tuple[float, ...]) -> tuple[float, torch.Tensor]:
    """The ``α`` of ``grid`` (and its producer-width scales) whose smoothing leaves the least W8A8
    error on the consumers' inputs ``x``."""
    best = (float("inf"), grid[0], None)
    w_absmax = mapping.reduce(weight_absmax(weights))
    for alpha in grid:
        s = smoothing_scales(x_absmax, w_absmax, alpha)
        err = w8a8_error(x, weights, mapping.expand(s))
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def _input_stats(runner: BlockRunner, linears: dict[str, nn.Linear], names: list[str],
                 keep_tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-channel ``max|X|`` over all tokens, and an evenly strided sample of ``keep_tokens`` input rows,
    for each Linear in ``names``."""
    total = sum(h.shape[:-1].numel() for h in runner.hidden)
    stride = max(1, -(-total // keep_tokens)) if keep_tokens else 0
    absmax: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        m = x.abs().amax(dim=0).float()
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        if stride:
            rows[name].append(x[::stride].float())

    with capture_hooks({n: linears[n] for n in names}, keep):
        runner.run(stop_before=linears[names[-1]])
    samples = {n: torch.cat(r)[:keep_tokens] for n, r in rows.items() if r}
    return absmax, samples


@register_calibrated("smoothquant", SmoothQuantConfig, "SmoothQuant W8A8: smoothed int8 weights, int8 per-token activations",
                     fallback=round_to_nearest)
def quantize_block(config: SmoothQuantConfig, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
                   runner: BlockRunner) -> dict[str, QuantizedWeight]:
    mappings = block_mappings(runner.block, linears, grouped=True)
    keep_tokens = config.search_tokens if config.alpha is None else 0
    absmax, samples = _input_stats(runner, linears, [m.consumers[0] for m in mappings], keep_tokens)
    for mapping in mappings:
        lead = mapping.consumers[0]
        consumers = [linears[f] for f in mapping.consumers]
        weights = [c.weight for c in consumers]
        x_absmax = mapping.reduce(absmax[lead])
        if config.alpha is None:
            alpha, s = search_alpha(samples[lead], mapping, x_absmax, weights, config.alpha_grid)
            log.debug("SmoothQuant -> %s: alpha %.2f", mapping.consumers, alpha)
        else:
            s = smoothing_scales(x_absmax, mapping.reduce(weight_absmax(weights)), config.alpha)
        fold_scales(mapping.producer, consumers, s, mapping.expand(s))
    if isinstance(config.quantizer, GPTQConfig):
        return gptq.quantize_block(config.quantizer, linears, specs, runner)
    return round_block_to_nearest(linears, specs, runner)
