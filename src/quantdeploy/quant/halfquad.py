"""Calibration-free affine grids fitted by half-quadratic splitting: HQQ's idea, with the scale fitted too.

Round-to-nearest takes each group's grid from its range (or a clipped range, ``primitives.choose_qparams``).
HQQ (Badri & Shaji, 2023) instead fits the grid to the weights under an l_p loss with p < 1, which lets
a few weights keep large errors so that all the others get small ones. It splits the weight error off as
a variable ``E`` and alternates, per group, for a fixed number of steps:

- ``q = clamp(round(W / s + z), 0, 2^b - 1)``: the codes of the current grid;
- ``E = shrink_p(W - s (q - z), beta)``: the proximal step of ``|E|^p / beta``, a generalized soft
  threshold that keeps the large errors and zeroes the small ones;
- the quadratic step: the grid that best maps the codes onto ``W - E``. HQQ moves the zero point alone
  (``z = mean(q - (W - E) / s)``) and keeps the min-max scale; here the least-squares line
  ``W - E ≈ s q + m`` over the group gives both, ``s`` and ``z = -m / s``.

``beta`` grows by ``kappa`` each step (the split tightens). It starts, as HQQ does, from the min-max grid
with its zero point rounded to an integer; from there the zero points are real numbers, stored in fp16
(``spec.float_zeros``): rounding them back to integer codes undid most of the gain (bundled model, int4
g64: 0.33 mean KLD against 0.19). At the scale of an LLM's weights (errors of about 1e-2) the threshold
``|e|^(p-1) / beta`` exceeds every error, so ``E`` stays 0 and each step is an alternation of least
squares, the codes given the line and the line given the codes; that the scale moves too is what beats
HQQ's zero-only step. Each group is fitted alone (no early stop over a whole tensor), for ``iters`` steps.
Numbers on the bundled model: README, "Calibration-free" (``benchmarks/fidelity_grids.py``).

Pure tensor math: ``w [..., G]`` in, scales and zero points ``[..., 1]`` out; no modules, no devices.
"""

from __future__ import annotations

import torch

from quantdeploy.quant.primitives import dequantize_affine

#: Bounds of a stored real zero point: fp16 resolves a 64th of a step up to 16 and a 4th up to 256.
ZERO_LIMIT = 256.0


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of ``|x|^p / beta``, for ``p <= 1``: ``sign(x) · max(|x| - |x|^(p-1) / beta, 0)``."""
    a = x.abs()
    return torch.sign(x) * (a - a.pow(p - 1) / beta).clamp_min(0)  # |x| = 0: 0 - inf clamps to 0


def stored(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 scale (> 0) and real zero point (fp16 values, held in fp32) the checkpoint keeps."""
    tiny = torch.finfo(torch.float16).tiny
    s16 = scale.clamp(tiny, torch.finfo(torch.float16).max).to(torch.float16)
    return s16, zero.clamp(-ZERO_LIMIT, ZERO_LIMIT).to(torch.float16).float()


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s + z), 0, 2^b - 1)`` in fp32 (``z`` real)."""
    return torch.round(w / scale.float() + zero).clamp(0, 2**bits - 1)


def fit_grid(w: torch.Tensor, bits: int, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and real zero points ``[..., 1]`` for the groups ``w [..., G]`` (see the module docstring)."""
    w = w.float()
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    # a group far from 0 relative to its spread would need a zero point past ZERO_LIMIT: span 0 too
    far = (hi - lo) * ZERO_LIMIT < qmax * torch.minimum(lo.abs(), hi.abs()) * (lo * hi > 0)
    lo, hi = torch.where(far, lo.clamp(max=0), lo), torch.where(far, hi.clamp(min=0), hi)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    s, z = stored(scale, torch.round(-lo / scale))  # HQQ's start: the min-max grid with an integer zero
    for _ in range(iters):
        s = s.float()
        q = codes(w, s, z, bits)
        target = w - shrink_lp(w - dequantize_affine(q, s, z), beta, lp_norm)
        qc = q - q.mean(dim=-1, keepdim=True)
        var = qc.pow(2).mean(dim=-1, keepdim=True)
        slope = (qc * target).mean(dim=-1, keepdim=True) / var.clamp_min(1e-12)
        s = torch.where((var > 0) & (slope > 0), slope, s)  # a group on one code keeps its scale
        z = q.mean(dim=-1, keepdim=True) - target.mean(dim=-1, keepdim=True) / s
        beta *= kappa
        s, z = stored(s, z)
    return s, z


__all__ = ["fit_grid", "shrink_lp", "stored", "codes", "ZERO_LIMIT"]
