"""``halfquad``: calibration-free integer grids whose scale and real zero point are fitted per group.

No data: each group's grid is fitted to its weights by half-quadratic splitting (``quant/halfquad.py``),
HQQ's method with the scale fitted as well. What is stored is the asymmetric integer layout of ``rtn``
with fp16 zero points (``QuantSpec.float_zeros``): 4.5 bits per weight at int4 g64, as HQQ stores.
"""

from __future__ import annotations

import dataclasses

import torch

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.halfquad import codes, fit_grid
from quantdeploy.quant.methods import register
from quantdeploy.quant.primitives import QuantizedWeight, pack_affine, quantize_weight
from quantdeploy.quant.spec import INT_DTYPES, QuantSpec
from quantdeploy.quant.targets import TargetConfig

#: Weights fitted at once: the fit holds a few fp32 copies of them.
CHUNK_WEIGHTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class HalfQuadConfig(Config):
    """bits in {2, 3, 4, 8}; group_size (None: per output channel; default 64, HQQ's); pin_group_size as
    for rtn. iters, lp_norm, beta and kappa are the fit's (HQQ's defaults: 20 steps, p = 0.7, beta 10
    growing by 1% a step)."""

    TYPE = "halfquad"
    VERSION = 1

    bits: int = 4
    group_size: int | None = 64
    pin_group_size: bool = False
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    targets: TargetConfig = TargetConfig()

    def validate(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"halfquad supports 2, 3, 4 or 8 bits, got {self.bits}")
        if self.iters < 0:
            raise ConfigError(f"halfquad iters must be >= 0, got {self.iters}")
        if not 0 < self.lp_norm <= 1:
            raise ConfigError(f"halfquad lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ConfigError(f"halfquad needs beta > 0 and kappa >= 1, got {self.beta} and {self.kappa}")
        self.base_spec()

    def base_spec(self) -> QuantSpec:
        return QuantSpec(dtype=f"int{self.bits}", group_size=self.group_size, symmetric=False, float_zeros=True)


@register("halfquad", HalfQuadConfig, "calibration-free grids fitted per group (HQQ's half-quadratic fit, scale too)")
def fit_and_round(config: Config, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """The codes of each group on its fitted grid, stored with fp16 scales and real zero points. A layer
    that a per-layer plan (mixed precision) gives another spec is rounded to nearest on that spec's grid,
    with the clip search below 8 bits, as ``rtn`` does by default."""
    if not spec.float_zeros:
        return quantize_weight(weight, spec, clip_search=spec.dtype in INT_DTYPES and spec.bits < 8)
    out_features, in_features = weight.shape
    group = spec.group_for(in_features)
    wg = weight.detach().float().reshape(out_features, in_features // group, group)
    rows = max(1, CHUNK_WEIGHTS // in_features)
    parts = [fit_grid(chunk, spec.bits, config.iters, config.lp_norm, config.beta, config.kappa) for chunk in wg.split(rows)]
    scale, zero = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    q = codes(wg, scale, zero, spec.bits).to(torch.uint8).reshape(out_features, in_features)
    return pack_affine(q, scale.squeeze(-1), zero.squeeze(-1), spec)
