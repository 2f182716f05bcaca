"""Property tests of the quantization math: error bounds, idempotence, no zero scales, no NaN."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.quant import nf4
from quantdeploy.quant.primitives import (
    FP8_MAX, choose_qparams, dequantize_affine, dequantize_weight, quantize_affine, quantize_weight,
    roundtrip_error, tensor_layout,
)
from quantdeploy.quant.spec import QuantSpec

INT_BITS = [2, 3, 4, 8]


def weights(seed: int, out: int, n: int, scale: float, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * scale
    if outliers:
        w[:, torch.randint(0, n, (2,), generator=g)] *= 20
    return w


def group_scales(qw) -> torch.Tensor:
    out, n = qw.shape
    return qw.tensors["scales"].float().repeat_interleave(qw.spec.group_for(n), dim=1)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from(INT_BITS), symmetric=st.booleans(), group=st.sampled_from([8, 16, 32, None]),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
def test_int_roundtrip_within_half_a_step(bits, symmetric, group, seed, scale):
    w = weights(seed, 3, 64, scale)
    qw = quantize_weight(w, QuantSpec(dtype=f"int{bits}", group_size=group, symmetric=symmetric))
    deq = dequantize_weight(qw)
    s = group_scales(qw)
    assert (qw.tensors["scales"] > 0).all()
    assert ((w - deq).abs() <= s / 2 + 1e-6 * w.abs().max()).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(INT_BITS), group=st.sampled_from([8, 32, None]), seed=st.integers(0, 2**16))
def test_symmetric_requantization_is_idempotent(bits, group, seed):
    spec = QuantSpec(dtype=f"int{bits}", group_size=group)
    once = dequantize_weight(quantize_weight(weights(seed, 4, 64, 0.1), spec))
    twice = dequantize_weight(quantize_weight(once, spec))
    assert torch.equal(once, twice)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(INT_BITS), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_codes_are_a_projection_for_fixed_qparams(bits, symmetric, seed):
    w = weights(seed, 4, 32, 0.1)
    scale, zero = choose_qparams(w, bits, symmetric)
    q = quantize_affine(w, scale, zero, bits)
    assert torch.equal(quantize_affine(dequantize_affine(q, scale, zero), scale, zero, bits), q)


def _group_errors(w: torch.Tensor, qw) -> torch.Tensor:
    """The clip search's objective per group: rounding errors weighted by w²."""
    out, n = w.shape
    return (w.pow(2) * (w - dequantize_weight(qw)).pow(2)).reshape(out, -1, qw.spec.group_for(n)).sum(-1)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(INT_BITS), symmetric=st.booleans(), group=st.sampled_from([8, 32, None]),
       seed=st.integers(0, 2**16), outliers=st.booleans())
def test_clip_search_never_rounds_a_group_worse_than_its_whole_range(bits, symmetric, group, seed, outliers):
    w = weights(seed, 4, 64, 0.1, outliers)
    spec = QuantSpec(dtype=f"int{bits}", group_size=group, symmetric=symmetric)
    whole, searched = quantize_weight(w, spec), quantize_weight(w, spec, clip_search=True)
    assert (_group_errors(w, searched) <= _group_errors(w, whole) * (1 + 1e-6)).all()
    assert torch.equal(dequantize_weight(searched), dequantize_weight(quantize_weight(w, spec, True)))  # deterministic


def test_clip_search_pays_on_gaussian_groups():
    w = weights(0, 64, 256, 0.02, outliers=False)
    for bits, most in ((3, 0.9), (4, 0.95)):  # measured 0.84 and 0.91 of the whole range's
        spec = QuantSpec(dtype=f"int{bits}", group_size=64)
        whole, searched = _group_errors(w, quantize_weight(w, spec)), _group_errors(w, quantize_weight(w, spec, True))
        assert searched.sum() < most * whole.sum()


def test_the_symmetric_grid_uses_every_code():
    from quantdeploy.quant.packing import unpack_bits

    w = torch.tensor([[-8.0, -1.0, 0.0, 3.0, 7.0, 2.0, -4.0, 5.0]])  # 16 levels of one step: -8 .. 7
    qw = quantize_weight(w, QuantSpec(dtype="int4", group_size=8))
    codes = unpack_bits(qw.tensors["qweight"], 4, 8)
    assert qw.tensors["scales"].item() == 1.0 and codes.min() == 0 and codes.max() == 15
    assert torch.equal(dequantize_weight(qw), w)
    mirrored = quantize_weight(-w, QuantSpec(dtype="int4", group_size=8))  # +8 is the longer side now: step 8/7
    assert mirrored.tensors["scales"].item() == pytest.approx(8 / 7, rel=1e-3)


@pytest.mark.parametrize("dtype", ["int2", "int3", "int4", "int8", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("fill", [0.0, 0.7, -3.0])
def test_zero_and_constant_rows_have_positive_scales_and_no_nan(dtype, fill):
    w = torch.full((3, 64), fill)
    w[1] = 0.0
    qw = quantize_weight(w, QuantSpec(dtype=dtype, group_size=32, symmetric=True))
    deq = dequantize_weight(qw)
    assert torch.isfinite(deq).all()
    scales = qw.tensors["scales"]
    if scales.dtype != torch.uint8:
        assert (scales.float() > 0).all()
    torch.testing.assert_close(deq, w, atol=1e-3 * max(abs(fill), 1), rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_asymmetric_and_symmetric_zero_is_exact(symmetric):
    w = weights(0, 4, 64, 1.0)
    w[:, ::7] = 0.0
    deq = dequantize_weight(quantize_weight(w, QuantSpec(dtype="int4", group_size=16, symmetric=symmetric)))
    assert (deq[:, ::7] == 0).all()


def test_fp8_roundtrip_relative_error_bound():
    w = weights(1, 8, 128, 0.02)
    qw = quantize_weight(w, QuantSpec(dtype="fp8_e4m3", group_size=None))
    assert qw.tensors["qweight"].dtype == torch.float8_e4m3fn
    deq = dequantize_weight(qw)
    s = qw.tensors["scales"].unsqueeze(-1)
    # E4M3 has 3 mantissa bits: half an ulp is 2^-4 relative; subnormals (< 2^-6) are 2^-9 apart.
    bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * 1.0001
    assert ((w - deq).abs() <= bound).all()
    assert float(deq.abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-6)
    assert (w.abs().amax(dim=1) / qw.tensors["scales"].squeeze(-1)).max() <= FP8_MAX * (1 + 1e-6)


def test_nf4_levels_are_the_published_ones():
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    torch.testing.assert_close(nf4.nf4_levels(), torch.tensor(published), atol=1e-6, rtol=0)


def test_dynamic_map_shape():
    m = nf4.dynamic_map()
    assert m.numel() == 256 and torch.all(m[1:] > m[:-1])
    assert m.max() == 1.0 and (m == 0).sum() == 1 and m.min() > -1.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), double_quant=st.booleans())
def test_nf4_roundtrip_bound_and_idempotence(seed, double_quant):
    w = weights(seed, 8, 128, 0.05)
    spec = QuantSpec(dtype="nf4", group_size=64, double_quant=double_quant)
    qw = quantize_weight(w, spec)
    deq = dequantize_weight(qw)
    levels = nf4.nf4_levels()
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    absmax = w.reshape(8, 2, 64).abs().amax(-1)
    stored = nf4.dequantize_scales(qw.tensors) if double_quant else qw.tensors["scales"]
    # |x*a - L*a_hat| <= a*|x - L| + |L|*|a - a_hat|, with |L| <= 1
    bound = absmax * half_gap + (absmax - stored).abs()
    assert ((w - deq).abs() <= bound.repeat_interleave(64, dim=1) * (1 + 1e-5)).all()
    if not double_quant:
        assert torch.equal(dequantize_weight(quantize_weight(deq, spec)), deq)


def test_double_quant_saves_bits_and_keeps_scales_close():
    w = weights(3, 64, 512, 0.05)
    plain = quantize_weight(w, QuantSpec(dtype="nf4", group_size=64))
    dq = quantize_weight(w, QuantSpec(dtype="nf4", group_size=64, double_quant=True))
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert dq.bits_per_weight < 4.14
    exact = plain.tensors["scales"]
    # 8-bit dynamic codes of (absmax - mean): the error is a small fraction of the spread
    spread = float((exact - exact.mean()).abs().max())
    assert float((nf4.dequantize_scales(dq.tensors) - exact).abs().max()) <= 0.01 * spread


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32), QuantSpec("int3", None, symmetric=False),
                                  QuantSpec("nf4", 64, double_quant=True), QuantSpec("fp8_e4m3", None)])
def test_layout_matches_quantized_tensors(spec):
    qw = quantize_weight(weights(0, 16, 128, 0.1), spec)
    layout = tensor_layout(spec, 16, 128)
    assert set(layout) == set(qw.tensors)
    for name, (shape, dtype) in layout.items():
        assert tuple(qw.tensors[name].shape) == shape and qw.tensors[name].dtype == dtype, name


def test_more_bits_means_less_error():
    w = weights(5, 32, 256, 0.05)
    errors = [roundtrip_error(w, QuantSpec(f"int{b}", 64))["rms"] for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert roundtrip_error(w, QuantSpec("int8", None))["sqnr_db"] > 25  # 20x outlier columns set the row scales
    assert math.isinf(roundtrip_error(torch.zeros(4, 64), QuantSpec("int4", 64))["sqnr_db"])


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32), QuantSpec("int3", None, symmetric=False),
                                  QuantSpec("nf4", 64), QuantSpec("fp8_e4m3", None)])
def test_fake_quantize_equals_the_stored_roundtrip(spec):
    from quantdeploy.quant.primitives import fake_quantize

    w = weights(2, 16, 128, 0.1)
    assert torch.equal(fake_quantize(w, spec), dequantize_weight(quantize_weight(w, spec)))
