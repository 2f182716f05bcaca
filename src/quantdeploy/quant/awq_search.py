"""AWQ's two searches (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"), as pure functions.

*Scale search* (Sec. 3.2): for Linear layers that read the same input ``X``, find per-input-channel
scales ``s = mean|X|^α / mean|Ŵ|^(1-α)`` (``Ŵ``: weights normalised per group; then normalised so that
``max(s)·min(s) = 1``) over a grid of ``α ∈ [0, 1)``, choosing the one that minimises the output error
``‖X Wᵀ − (X/s) Q(W·s)ᵀ‖²``. Scaling salient channels up before rounding protects them; ``1/s`` is
folded into the op that produces ``X`` (a norm or a Linear), so the float model is unchanged.

*Clip search*: for each output channel and group, shrink the clipping range ``[-m, m]`` by up to
``max_shrink`` and keep the one that minimises that group's output error.

Both errors are evaluated through the Gram matrix ``G = XᵀX / n`` rather than the activations: with
``D = W − Q(W·s)/s``, ``‖X Dᵀ‖² / n = tr(D G Dᵀ)``, and a group's error uses its diagonal block of
``G``. That is exact, costs no more than one pass to collect ``G`` (the same statistic GPTQ's Hessian
is), and lets every calibration token count, where activation-based searches subsample.

``quantize_fn(W)`` is the fake quantizer (quantize, then dequantize) of the spec the weights will get.
"""

from __future__ import annotations

from typing import Callable

import torch

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def output_error(D: torch.Tensor, G: torch.Tensor) -> float:
    """``tr(D G Dᵀ)``: the mean squared output error of a weight error ``D [out, in]`` on inputs with Gram ``G``."""
    return float(((D @ G) * D).sum())


def search_scales(G: torch.Tensor, x_absmean: torch.Tensor, weights: list[torch.Tensor], quantize_fn: FakeQuant,
                  group_size: int, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-channel scales ``[in]`` for layers ``weights`` (each ``[out_i, in]``) reading inputs with
    Gram ``G [in, in]`` and mean magnitude ``x_absmean [in]``; also the relative error they leave."""
    W = torch.cat([w.float() for w in weights], dim=0)  # [sum(out), in]
    grouped = W.abs().reshape(W.shape[0], -1, group_size)
    w_mean = (grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(dim=0)
    best_err, best_scales = float("inf"), torch.ones_like(x_absmean)
    for step in range(n_grid):
        alpha = step / n_grid
        s = (x_absmean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(W - quantize_fn(W * s) / s, G)
        if err < best_err:
            best_err, best_scales = err, s
    return best_scales, best_err / max(output_error(W, G), 1e-30)


def search_clip(G: torch.Tensor, w: torch.Tensor, quantize_fn: FakeQuant, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Best clipping magnitude ``[out, n_groups]`` for ``w [out, in]`` given the input Gram ``G``.

    The error of group ``g`` of row ``r`` is ``d_rgᵀ G_gg d_rg`` with ``d = q − w`` on that group.
    """
    out_features, n = w.shape
    n_groups = n // group_size
    idx = torch.arange(n_groups, device=G.device)
    blocks = G.reshape(n_groups, group_size, n_groups, group_size)[idx, :, idx, :]  # [n_groups, G, G]
    wg = w.float().reshape(out_features, n_groups, group_size)
    org_max = wg.abs().amax(dim=-1)  # [rows, n_groups]
    best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for step in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - step / n_grid)
        bound = max_val.unsqueeze(-1)
        q = quantize_fn(torch.maximum(torch.minimum(wg, bound), -bound).reshape(w.shape))
        d = (q.reshape(wg.shape) - wg).transpose(0, 1)  # [n_groups, rows, G]
        err = (torch.bmm(d, blocks) * d).sum(dim=-1).T  # [rows, n_groups]
        better = err < min_err
        min_err = torch.where(better, err, min_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` clamped to ``[-max_val, max_val]`` per (row, group)."""
    bound = max_val.repeat_interleave(group_size, dim=1).to(w.dtype)
    return torch.maximum(torch.minimum(w, bound), -bound)


def scale_gram(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``X / s`` from that of ``X``."""
    inv = 1.0 / s
    return G * inv.unsqueeze(0) * inv.unsqueeze(1)
