"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), as a pure function of a weight and its Hessian.

Notation follows the paper: ``W`` is ``[out, in]``, ``H = 2 X Xᵀ / n`` is the ``[in, in]`` Hessian of
the layer's squared output error, ``H⁻¹`` is taken through its upper Cholesky factor (Algorithm 1).
Columns are quantized one at a time; the error of each, scaled by ``1 / [H⁻¹]_qq``, is spread over the
columns not yet quantized (Eq. 3). Lazy batch updates apply that spread ``block_size`` columns at a time.
Inside a block the column loop is :func:`quantize_columns`; on CUDA one Triton kernel per block runs
it instead (``quant/gptq_triton.py``; rows are independent, so one launch replaces ~12 per column).

- *act-order*: columns are visited in order of decreasing ``diag(H)``. With *static groups* the
  per-group scales and zeros are chosen before the pass, from the original weights in their natural
  groups, so the stored layout is the ordinary group-wise one and inference needs no reordering.
- without act-order, each group's parameters are chosen when its first column is reached, from the
  already-updated weights (the original GPTQ behaviour).
- *dampening*: ``λ = damp · mean(diag(H))`` is added to the diagonal; if Cholesky still fails,
  ``λ`` grows tenfold (up to four times) rather than crash.

No modules, hooks or devices here: the caller collects ``H`` and packs the codes.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from quantdeploy.quant.primitives import choose_qparams

log = logging.getLogger(__name__)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, growing λ if ``H`` is not positive definite."""
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if attempt:
                    log.info("Hessian needed dampening %.3g to be positive definite", damp * 10**attempt)
                return U
    raise ValueError("the Hessian is not positive definite even with strong dampening; "
                     "use more calibration samples or a larger damp_percent")


@dataclasses.dataclass
class PreparedHessian:
    """What GPTQ needs from ``H``, computed once for all layers that read the same input: the inputs
    that never fired (``dead``), the act-order visiting order (``perm``), and the upper Cholesky factor
    of the dampened inverse in that order."""

    dead: torch.Tensor
    perm: torch.Tensor
    Hinv: torch.Tensor
    act_order: bool


def prepare_hessian(H: torch.Tensor, act_order: bool = True, damp: float = 0.01) -> PreparedHessian:
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    return PreparedHessian(dead, perm, inverse_hessian_cholesky(H, damp), act_order)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | PreparedHessian,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``W [out, in]`` given ``H [in, in]`` (or its :func:`prepare_hessian`, which then fixes
    act-order and dampening); returns codes (uint8 ``[out, in]``), scales (fp16 ``[out, n_groups]``)
    and zero points (int64 ``[out, n_groups]``) in natural column order."""
    out_features, n = W.shape
    if n % group_size:
        raise ValueError(f"group size {group_size} does not divide {n} columns")
    n_groups, maxq = n // group_size, 2**bits - 1
    prepared = H if isinstance(H, PreparedHessian) else prepare_hessian(H, act_order, damp)
    act_order, perm, Hinv = prepared.act_order, prepared.perm, prepared.Hinv
    W = W.detach().float().clone()
    W[:, prepared.dead] = 0

    scales = torch.empty(out_features, n_groups, dtype=torch.float16, device=W.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int64, device=W.device)
    if act_order:  # static groups, from the original weights
        s, z = choose_qparams(W.reshape(out_features, n_groups, group_size), bits, symmetric, clip_search)
        scales.copy_(s.squeeze(-1))
        zeros.copy_(z.squeeze(-1))
        W = W[:, perm]

    codes = torch.empty(out_features, n, dtype=torch.uint8, device=W.device)  # in visiting order
    # Per-column scale and zero in visiting order (filled group by group without act-order).
    S = scales.float()[:, perm // group_size] if act_order else torch.empty_like(W)
    Z = zeros.float()[:, perm // group_size] if act_order else torch.empty_like(W)
    columns = column_solver(W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # Without act-order a group's parameters come from the weights as updated so far, so the block
        # is solved in segments that start at group boundaries, each spreading its error on (Eq. 3).
        cuts = [i1] if act_order else sorted({i1, *range(-(-i1 // group_size) * group_size, i2, group_size)})
        for a, b in zip(cuts, cuts[1:] + [i2]):
            a1, b1 = a - i1, b - i1
            if not act_order and a % group_size == 0:
                g = a // group_size
                s, z = choose_qparams(torch.cat([W1[:, a1:], W[:, i2:]], dim=1)[:, :group_size], bits, symmetric,
                                      clip_search)
                scales[:, g], zeros[:, g] = s.squeeze(-1), z.squeeze(-1)
                S[:, a:a + group_size], Z[:, a:a + group_size] = s.float(), z.float()
            codes[:, a:b], Err1[:, a1:b1] = columns(W1[:, a1:b1], S[:, a:b], Z[:, a:b], Hinv1[a1:b1, a1:b1], maxq)
            W1[:, b1:].addmm_(Err1[:, a1:b1], Hinv1[a1:b1, b1:], alpha=-1)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update
    natural = torch.empty_like(codes)
    natural[:, perm] = codes
    return natural, scales, zeros


def quantize_columns(W1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, Hinv1: torch.Tensor,
                     maxq: int, sub_block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference column loop over consecutive columns ``W1 [rows, k]`` with per-column scales and
    zeros ``S1, Z1`` and the matching ``[k, k]`` block of ``H⁻¹``'s upper Cholesky factor: quantize a
    column, spread its scaled error over the later columns. Returns codes (uint8) and the scaled errors
    ``[rows, k]`` that the caller spreads over the columns after these.

    Works on transposed copies, so that each column is a contiguous row, and spreads errors within
    ``sub_block`` columns at a time, the rest with one matrix product per sub-block (the lazy-batch idea
    again, one level down): the same arithmetic as the textbook loop, with fewer, cheaper operations."""
    Wt, St, Zt = W1.T.contiguous(), S1.T.float().contiguous(), Z1.T.float().contiguous()
    k = Wt.shape[0]
    Qt, Et = torch.empty_like(Wt), torch.empty_like(Wt)
    d = torch.diagonal(Hinv1)
    for j0 in range(0, k, sub_block):
        j1 = min(j0 + sub_block, k)
        for i in range(j0, j1):
            w, s, z = Wt[i], St[i], Zt[i]
            q = torch.round(w / s).add_(z).clamp_(0, maxq)
            Qt[i] = q
            err = torch.addcmul(w, s, q - z, value=-1).div_(d[i])
            Et[i] = err
            if i + 1 < j1:  # Eq. 3: spread the error over the later columns of this sub-block
                Wt[i + 1:j1].addr_(Hinv1[i, i + 1:j1], err, alpha=-1)
        if j1 < k:
            Wt[j1:].addmm_(Hinv1[j0:j1, j1:].T, Et[j0:j1], alpha=-1)
    return Qt.T.to(torch.uint8), Et.T.contiguous()


def column_solver(device: torch.device):
    """The column loop for ``device``: the Triton kernel on CUDA (``quant/gptq_triton.py``), else the
    reference loop above (the oracle the kernel is tested against)."""
    if device.type == "cuda":
        try:
            from quantdeploy.quant.gptq_triton import quantize_columns as triton_columns
        except ImportError:
            log.warning("triton is not installed, so GPTQ runs its slow reference loop on the GPU; "
                        "pip install 'quantdeploy[gpu]'")
        else:
            return triton_columns
    return quantize_columns


def hessian_update(H: torch.Tensor, x: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of ``x [..., in]``; returns the new ``(H, n)``."""
    x = x.reshape(-1, x.shape[-1]).float()
    rows = x.shape[0]
    total = count + rows
    H.mul_(count / total).addmm_(x.T, x, alpha=2.0 / total)
    return H, total
