"""Pure tensor functions: choose quantization parameters, quantize, dequantize, measure error.

Everything here maps tensors to tensors: no modules, hooks or devices. The canonical stored layout of
a quantized ``[out_features, in_features]`` weight with ``G`` = group length and ``n_groups = in/G``:

=============  ===============================  ==================================================
dtype          tensor                           shape, dtype, meaning
=============  ===============================  ==================================================
int2/3/4/8     ``qweight``                      uint8 ``[out, in*bits/8]``: codes packed (packing.py)
               ``scales``                       fp16 ``[out, n_groups]``, always > 0
               ``zeros`` (asymmetric only)      uint8 ``[out, n_groups]``: integer zero-point codes, or
                                                fp16 real zero points (``spec.float_zeros``)
nf4            ``qweight``                      uint8 ``[out, in/2]``: NF4 level indices, packed
               ``scales``                       fp32 ``[out, n_groups]`` absmax, or with double quant
                                                uint8 codes plus ``scales_absmax`` and ``scales_offset``
fp8_e4m3       ``qweight``                      float8_e4m3fn ``[out, in]``
               ``scales``                       fp32 ``[out, n_groups]``
=============  ===============================  ==================================================

Integer grids (the affine scheme of Jacob et al. 2018): ``w ≈ s * (q - z)``. Symmetric grids have the
implied zero ``z = 2^(b-1)`` and use all ``2^b`` codes, ``-2^(b-1) .. 2^(b-1) - 1`` steps (the grid of
GPTQ, compressed-tensors, torchao and llama.cpp's Q4_0/Q8_0): ``s = max(max(w) / (2^(b-1) - 1),
-min(w) / 2^(b-1))``, so the longer side of a group reaches the extra negative level when it is the
negative one. (Before format 2 of RTN/GPTQ the scale was ``max|w| / (2^(b-1) - 1)`` and the lowest code
went unused: int4 had 15 levels, int3 7, int2 3. Old checkpoints read the same way, ``s * (q - z)``.)
Asymmetric grids stretch ``[min(w, 0), max(w, 0)]`` over ``[0, 2^b - 1]`` with an integer ``z`` so that 0
is exact. Scales are stored in fp16, rounded *up* so that no weight is clipped, and never zero (an
all-zero group gets 1).

Clip search (``clip_search=True``): the range above keeps every weight; shrinking it clips the few
largest weights of a group but makes every other step finer. For each group the range is shrunk by the
factors ``CLIP_SHRINKS`` and the one with the least rounding error *weighted by w²* is kept, the
importance llama.cpp's ``make_qx_quants`` gives its scale search without an importance matrix. The
weighting matters: on the bundled model (``benchmarks/fidelity_grids.py``) plain squared error made
int4 worse (mean KLD 0.3920 → 0.3951 at g64 sym, 0.4747 → 0.5146 at g128), because it clips the large
weights whose errors the outputs feel most; weighted by w² it made int4 sym g64 better (0.3543).
"""

from __future__ import annotations

import dataclasses

import torch

from quantdeploy.quant import nf4
from quantdeploy.quant.packing import pack_bits, packed_length, unpack_bits
from quantdeploy.quant.spec import INT_DTYPES, QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized weight matrix: its spec, logical shape and the stored tensors (names fixed)."""

    spec: QuantSpec
    shape: tuple[int, int]  # (out_features, in_features)
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes plus scales and zeros) per original weight."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])


def tensor_layout(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the stored tensors for ``spec`` (see the module docstring)."""
    group = spec.group_for(in_features)
    if in_features % group:
        raise ValueError(f"group size {group} does not divide in_features {in_features}")
    n_groups = in_features // group
    if spec.dtype == "fp8_e4m3":
        return {"qweight": ((out_features, in_features), torch.float8_e4m3fn),
                "scales": ((out_features, n_groups), torch.float32)}
    if spec.dtype == "nf4":
        return {"qweight": ((out_features, packed_length(in_features, 4)), torch.uint8),
                **nf4.scale_layout(out_features, n_groups, spec.double_quant)}
    layout = {"qweight": ((out_features, packed_length(in_features, spec.bits)), torch.uint8),
              "scales": ((out_features, n_groups), torch.float16)}
    if not spec.symmetric:
        layout["zeros"] = ((out_features, n_groups), zero_dtype(spec))
    return layout


def zero_dtype(spec: QuantSpec) -> torch.dtype:
    """The stored dtype of an asymmetric grid's zero points: integer codes, or fp16 real numbers."""
    return torch.float16 if spec.float_zeros else torch.uint8


def storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales to fp16, rounded up so ``|w|/s`` never exceeds the grid; zeros become 1."""
    s16 = scale.clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    s16 = torch.where(s16.float() < scale, up, s16)
    return torch.where(s16 == 0, torch.ones_like(s16), s16)


#: Factors the range ``[min(w, 0), max(w, 0)]`` of a group is shrunk by in the clip search (1: no clip).
CLIP_SHRINKS = tuple(1 - 0.01 * i for i in range(41))


def grid_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16, > 0) and zero point (int64) of the grid that spans ``[lo <= 0, hi >= 0]``."""
    if symmetric:
        half = 2 ** (bits - 1)
        scale = storable_scale(torch.maximum(hi / (half - 1), -lo / half))
        return scale, torch.full_like(scale, half, dtype=torch.int64)
    qmax = 2**bits - 1
    scale = storable_scale((hi - lo) / qmax)
    return scale, torch.round(-lo / scale.float()).clamp(0, qmax).to(torch.int64)


def rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``sum(w² (w - dq(q(w)))²)`` over the last axis of ``w [..., G]``, shape ``[..., 1]``: the clip
    search's objective (see the module docstring for why the errors are weighted by ``w²``)."""
    deq = dequantize_affine(quantize_affine(w, scale, zero, bits), scale, zero)
    return (w.pow(2) * (w - deq).pow(2)).sum(dim=-1, keepdim=True)


def choose_qparams(w: torch.Tensor, bits: int, symmetric: bool, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16, > 0) and zero point (int64 code) for each row of ``w [..., G]``; shapes ``[..., 1]``.
    With ``clip_search`` each row's range is the shrink of ``CLIP_SHRINKS`` with the least ``rounding_error``."""
    w = w.float()
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale, zero = grid_for_range(lo, hi, bits, symmetric)
    if not clip_search:
        return scale, zero
    best = rounding_error(w, scale, zero, bits)
    for shrink in CLIP_SHRINKS[1:]:
        s, z = grid_for_range(lo * shrink, hi * shrink, bits, symmetric)
        err = rounding_error(w, s, z, bits)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    return scale, zero


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w/s) + z, 0, 2^b - 1)`` as uint8, for broadcastable ``scale``/``zero``."""
    q = torch.round(w.float() / scale.float()) + zero
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``s * (q - z)`` in fp32."""
    return (q.to(torch.float32) - zero.to(torch.float32)) * scale.float()


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % group:
        raise ValueError(f"group size {group} does not divide in_features {in_features}")
    return w.reshape(out_features, in_features // group, group)  # [out, n_groups, G]


def quantize_weight(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [out, in]`` onto the grid that ``spec`` names (integer grids:
    with ``clip_search``, each group's range from the search in ``choose_qparams``)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    wg = _grouped(w.detach().float(), spec.group_for(in_features))
    if spec.dtype == "nf4":
        tensors = nf4.quantize_nf4(wg, double_quant=spec.double_quant)
    elif spec.dtype == "fp8_e4m3":
        tensors = quantize_fp8(wg)
    else:
        scale, zero = choose_qparams(wg, spec.bits, spec.symmetric, clip_search)
        codes = quantize_affine(wg, scale, zero, spec.bits).reshape(out_features, in_features)
        tensors = {"qweight": pack_bits(codes, spec.bits), "scales": scale.squeeze(-1)}
        if not spec.symmetric:
            tensors["zeros"] = zero.squeeze(-1).to(zero_dtype(spec))
    return QuantizedWeight(spec=spec, shape=(out_features, in_features), tensors=tensors)


def pack_affine(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """A QuantizedWeight from integer codes ``[out, in]``, fp16 scales and zero points ``[out, n_groups]``
    chosen elsewhere (GPTQ, halfquad): the same stored layout as round-to-nearest produces."""
    tensors = {"qweight": pack_bits(codes, spec.bits), "scales": scales.to(torch.float16)}
    if not spec.symmetric:
        tensors["zeros"] = zeros.to(zero_dtype(spec))
    return QuantizedWeight(spec=spec, shape=tuple(codes.shape), tensors=tensors)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight that ``qw`` represents (the reference every kernel must match)."""
    out_features, in_features = qw.shape
    spec, t = qw.spec, qw.tensors
    group = spec.group_for(in_features)
    n_groups = in_features // group
    if spec.dtype == "nf4":
        w = nf4.dequantize_nf4(t, out_features, n_groups, group)
    elif spec.dtype == "fp8_e4m3":
        w = t["qweight"].to(torch.float32).reshape(out_features, n_groups, group) * t["scales"].unsqueeze(-1)
    else:
        codes = unpack_bits(t["qweight"], spec.bits, in_features).reshape(out_features, n_groups, group)
        if spec.symmetric:
            # a fill on the device, not a host-to-device copy: prefill CUDA graphs capture this
            zero = torch.full((), 2 ** (spec.bits - 1), dtype=torch.float32, device=codes.device)
        else:
            zero = t["zeros"].unsqueeze(-1)
        w = dequantize_affine(codes, t["scales"].unsqueeze(-1), zero)
    return w.reshape(out_features, in_features).to(dtype)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> torch.Tensor:
    """``dequantize_weight(quantize_weight(w, spec))`` without packing: for searches that try many grids."""
    if spec.dtype not in INT_DTYPES:
        return dequantize_weight(quantize_weight(w, spec))
    out_features, in_features = w.shape
    wg = _grouped(w.detach().float(), spec.group_for(in_features))
    scale, zero = choose_qparams(wg, spec.bits, spec.symmetric, clip_search)
    q = quantize_affine(wg, scale, zero, spec.bits)
    return dequantize_affine(q, scale, zero).reshape(out_features, in_features)


def quantize_fp8(wg: torch.Tensor) -> dict[str, torch.Tensor]:
    """E4M3 codes with one fp32 scale per group, ``s = max|w| / 448``; ``wg`` is ``[out, n_groups, G]``."""
    amax = wg.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wg / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"qweight": q.reshape(wg.shape[0], -1), "scales": scale.squeeze(-1)}


def quantize_activations(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of ``x [..., k]``: codes (int8 or float8_e4m3fn) and fp32 scales
    ``[..., 1]`` with ``x ≈ codes * scale`` (symmetric: int8 ``s = max|x| / 127``, fp8 ``s = max|x| / 448``)."""
    if dtype == "int8":
        codes, scale = int8_activations_float(x)
        return codes.to(torch.int8), scale
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    # times the fp32 reciprocal, not divided: what torch's CUDA division by a scalar computes, spelled out,
    # so the CPU, the GPU and the Triton quantizer (kernels/fp8_w8a8.py) agree bit for bit
    scale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def int8_activations_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activations(x, "int8")`` with the codes left in fp32 (integers, exact), for a product
    that sums them in fp32 (``kernels/cpu_w8a8.py`` without AVX-512): two conversions fewer per call."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-127, 127), scale


def int8_weight(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes ``[out, in]`` and fp32 scales ``[out]`` of a symmetric per-channel int8 weight."""
    codes = qw.tensors["qweight"].to(torch.int16) - 128
    return codes.to(torch.int8), qw.tensors["scales"].float().reshape(-1)


def roundtrip_error(w: torch.Tensor, spec: QuantSpec) -> dict[str, float]:
    """Error of quantize→dequantize on ``w``: max abs, RMS, and SQNR in dB."""
    deq = dequantize_weight(quantize_weight(w, spec))
    err = (w.float() - deq).flatten()
    signal = w.float().pow(2).mean()
    noise = err.pow(2).mean()
    sqnr = float("inf") if noise == 0 else float(10 * torch.log10(signal / noise))
    return {"max_abs": float(err.abs().max()), "rms": float(noise.sqrt()), "sqnr_db": sqnr}


__all__ = [
    "INT_DTYPES", "QuantizedWeight", "tensor_layout", "storable_scale", "choose_qparams", "grid_for_range",
    "rounding_error", "CLIP_SHRINKS", "zero_dtype",
    "quantize_affine", "dequantize_affine", "quantize_weight", "pack_affine", "fake_quantize", "quantize_activations", "int8_activations_float", "int8_weight", "dequantize_weight", "quantize_fp8",
    "roundtrip_error",
]
