"""NF4 (NormalFloat4) with optional double quantization, as QLoRA (Dettmers et al. 2023) defines it.

NF4 levels are quantiles of N(0, 1) scaled to [-1, 1]: 8 positive and 7 negative quantiles plus an
exact zero (Appendix E of the paper). Each group of weights stores its absmax in fp32 and 4-bit level
indices of ``w / absmax``. Double quantization stores the absmax values themselves as 8-bit codes of
bitsandbytes' signed dynamic map (Dettmers 2016), in blocks of 256 after subtracting their mean,
saving ~0.37 bits per weight at group 64. Pure tensor functions; no bitsandbytes dependency.
"""

from __future__ import annotations

import functools

import torch

from quantdeploy.quant.packing import pack_bits, unpack_bits

DQ_BLOCK = 256  # absmax values per second-level block (QLoRA: 256)
_NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile: the midpoint of 1-1/(2*15) and 1-1/(2*16)


@functools.lru_cache(maxsize=None)
def _nf4_levels_cpu() -> torch.Tensor:
    pos = torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    values = values / values.abs().max()
    return values.sort().values.to(torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(max_exponent_bits: int = 7) -> torch.Tensor:
    values: list[float] = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2) * 10.0 ** (e - (max_exponent_bits - 1))
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


#: the lookup tables, one copy per (table, device type, device index). A plain dict, not an lru_cache:
#: torch.compile traces through lru_cache wrappers (and failed on the map's ``tolist``), while a tensor
#: read from a dict is a constant of the compiled graph; and a dequantization inside a CUDA-graph capture
#: must not copy from the host. ``tables_on`` fills it before a model is compiled or captured.
_ON_DEVICE: dict[tuple[str, str, int | None], torch.Tensor] = {}


def tables_on(device: torch.device | str) -> None:
    """Put both tables on ``device`` now (the engine calls it when it prepares an NF4 layer)."""
    nf4_levels(device)
    dynamic_map(device=device)


def _on(name: str, device: torch.device | str, build) -> torch.Tensor:  # noqa: ANN001
    device = torch.device(device)
    key = (name, device.type, device.index)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = build().to(device)
    return _ON_DEVICE[key]


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values in ascending order, -1 and 1 included, 0 exact (fp32), one copy per device."""
    return _on("nf4", device, _nf4_levels_cpu)


def dynamic_map(max_exponent_bits: int = 7, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 ascending values in [-1, 1], 0 and 1 included.

    For exponent ``e`` in ``0..6`` the map holds ``2^e`` linearly spaced fractions (midpoints of
    ``linspace(0.1, 1, 2^e + 1)``) times ``10^(e - 6)``, with both signs; then 0 and 1. One copy per
    device, as ``nf4_levels``.
    """
    return _on(f"dynamic{max_exponent_bits}", device, lambda: _dynamic_map_cpu(max_exponent_bits))


def nearest_code(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ascending ``levels`` for each element of ``x`` (int64)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.device))


def scale_layout(out_features: int, n_groups: int, double_quant: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not double_quant:
        return {"scales": ((out_features, n_groups), torch.float32)}
    n_blocks = -(-out_features * n_groups // DQ_BLOCK)
    return {"scales": ((out_features, n_groups), torch.uint8),
            "scales_absmax": ((n_blocks,), torch.float32),
            "scales_offset": ((1,), torch.float32)}


def quantize_nf4(wg: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """NF4 codes of ``wg [out, n_groups, G]`` (fp32) and its per-group scales."""
    out_features, n_groups, group = wg.shape
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # [out, n_groups, 1]
    codes = nearest_code(wg / absmax, nf4_levels()).reshape(out_features, n_groups * group)
    tensors = {"qweight": pack_bits(codes, 4)}
    if double_quant:
        tensors.update(quantize_scales(absmax.reshape(out_features, n_groups)))
    else:
        tensors["scales"] = absmax.reshape(out_features, n_groups)
    return tensors


def quantize_scales(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Second-level quantization of ``absmax [out, n_groups]``: mean offset, blocks of 256, dynamic map."""
    flat = absmax.reshape(-1).float()
    offset = flat.mean().reshape(1)
    centred = flat - offset
    pad = (-centred.numel()) % DQ_BLOCK
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)  # [n_blocks, 256]
    block_max = blocks.abs().amax(dim=-1, keepdim=True)
    block_max = torch.where(block_max > 0, block_max, torch.ones_like(block_max))
    codes = nearest_code(blocks / block_max, dynamic_map()).to(torch.uint8)
    return {"scales": codes.reshape(-1)[: flat.numel()].reshape(absmax.shape),
            "scales_absmax": block_max.reshape(-1),
            "scales_offset": offset}


def dequantize_scales(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`quantize_scales`: fp32 absmax ``[out, n_groups]``."""
    codes = t["scales"]
    flat = dynamic_map(device=codes.device)[codes.reshape(-1).long()]
    block = torch.arange(flat.numel(), device=codes.device) // DQ_BLOCK
    return (flat * t["scales_absmax"][block] + t["scales_offset"]).reshape(codes.shape)


def dequantize_nf4(t: dict[str, torch.Tensor], out_features: int, n_groups: int, group: int) -> torch.Tensor:
    """fp32 ``[out, n_groups, G]`` weights from NF4 codes and (possibly double-quantized) scales."""
    absmax = dequantize_scales(t) if t["scales"].dtype == torch.uint8 else t["scales"]
    codes = unpack_bits(t["qweight"], 4, n_groups * group).reshape(out_features, n_groups, group)
    return nf4_levels(codes.device)[codes.long()] * absmax.unsqueeze(-1)
