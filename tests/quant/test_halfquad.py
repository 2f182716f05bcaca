"""The half-quadratic grid fit (quant/halfquad.py) and the halfquad method: never worse than the min-max
grid per group, real zero points stored in fp16, a checkpoint that saves, loads and runs on every path."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantdeploy as qd
from quantdeploy.errors import CheckpointError, ConfigError
from quantdeploy.kernels import cpu_packed, dense, prepare, reference
from quantdeploy.quant.halfquad import ZERO_LIMIT, codes, fit_grid, shrink_lp
from quantdeploy.quant.methods.halfquad import fit_and_round
from quantdeploy.quant.primitives import dequantize_affine, dequantize_weight, quantize_weight, tensor_layout
from quantdeploy.quant.spec import QuantSpec


def grouped(seed: int, rows: int, groups: int, size: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups, size, generator=g) * scale
    w[:, :, 3] *= 12  # an outlier in every group, as real weights have
    return w


@settings(max_examples=40, deadline=None)
@given(x=st.floats(-100, 100), beta=st.floats(0.5, 100), p=st.sampled_from([0.4, 0.7, 1.0]))
def test_shrink_moves_towards_zero_and_never_past_it(x, beta, p):
    y = float(shrink_lp(torch.tensor([x], dtype=torch.float64), beta, p))
    assert abs(y) <= abs(x) and (y == 0 or (y > 0) == (x > 0))


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.02, 1.0]))
def test_the_fitted_grid_is_storable_and_reconstructs_every_weight(bits, seed, scale):
    w = grouped(seed, 4, 3, 32, scale)
    s, z = fit_grid(w, bits)
    assert s.dtype == torch.float16 and bool((s > 0).all()) and bool(torch.isfinite(z).all())
    assert torch.equal(z, z.half().float()) and bool((z.abs() <= ZERO_LIMIT).all())
    deq = dequantize_affine(codes(w, s, z, bits), s, z)
    assert bool(torch.isfinite(deq).all())
    span = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True))
    assert bool(((deq - w).abs() <= span).all())  # no weight leaves its group's range by more than the range


def test_the_fit_lowers_the_lp_error_of_the_min_max_grid():
    w = grouped(3, 64, 8, 64)
    for bits in (3, 4):
        s, z = fit_grid(w, bits)
        s0, z0 = fit_grid(w, bits, iters=0)  # the min-max grid it starts from
        lp = [(w - dequantize_affine(codes(w, a, b, bits), a, b)).abs().pow(0.7).sum() for a, b in ((s, z), (s0, z0))]
        assert lp[0] < 0.97 * lp[1], (bits, lp)


def test_the_fit_beats_round_to_nearest_and_each_group_is_fitted_alone():
    w = grouped(0, 64, 4, 64)
    s, z = fit_grid(w, 4)
    fitted = (w - dequantize_affine(codes(w, s, z, 4), s, z)).abs().mean()
    plain = quantize_weight(w.reshape(64, 256), QuantSpec(dtype="int4", group_size=64, symmetric=False), clip_search=True)
    assert fitted < 0.95 * (w.reshape(64, 256) - dequantize_weight(plain)).abs().mean()
    s1, z1 = fit_grid(w[5:6, 2:3], 4)  # one group alone gets the grid it gets among all the others
    assert torch.equal(s1, s[5:6, 2:3]) and torch.equal(z1, z[5:6, 2:3])


def test_a_constant_group_and_a_group_far_from_zero_stay_finite():
    w = torch.stack([torch.full((32,), 0.3), torch.linspace(5.0, 5.001, 32), torch.zeros(32)])[:, None]
    s, z = fit_grid(w, 4)
    deq = dequantize_affine(codes(w, s, z, 4), s, z)
    assert bool(torch.isfinite(deq).all()) and float((deq - w).abs().max()) < 0.05


def test_the_method_stores_fp16_zero_points_and_its_layout():
    spec = qd.HalfQuadConfig(bits=4, group_size=32).base_spec()
    assert spec.float_zeros and not spec.symmetric and spec.describe() == "int4-asym-fz-g32"
    w = grouped(1, 16, 2, 32).reshape(16, 64)
    qw = fit_and_round(qd.HalfQuadConfig(), "m", w, spec)
    layout = tensor_layout(spec, 16, 64)
    assert {n: (tuple(t.shape), t.dtype) for n, t in qw.tensors.items()} == layout
    assert layout["zeros"][1] == torch.float16
    assert qw.bits_per_weight == pytest.approx(4 + 32 / 32)
    int8 = QuantSpec(dtype="int8", group_size=None)  # a per-layer plan's other spec: rounded onto its own grid
    assert fit_and_round(qd.HalfQuadConfig(), "m", w, int8).spec == int8


def test_config_and_spec_reject_what_they_cannot_store():
    with pytest.raises(ConfigError, match="asymmetric integer"):
        QuantSpec(dtype="int4", symmetric=True, float_zeros=True)
    with pytest.raises(ConfigError, match="asymmetric integer"):
        QuantSpec(dtype="nf4", float_zeros=True)
    with pytest.raises(ConfigError, match="lp_norm"):
        qd.HalfQuadConfig(lp_norm=1.5)
    assert QuantSpec.from_dict({"type": "quant_spec", "version": 1, "dtype": "int4", "group_size": 32,
                                "symmetric": False}).float_zeros is False  # format 1 specs read as before


def test_quantize_save_load_and_every_cpu_path_agree(tiny_bundle, tmp_path):
    q = qd.quantize(tiny_bundle, qd.HalfQuadConfig(bits=4, group_size=32))
    qd.save(q, tmp_path / "hq")
    qc = json.loads((tmp_path / "hq" / "quant_config.json").read_text())
    assert qc["method"]["type"] == "halfquad"
    loaded = qd.load(tmp_path / "hq")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, q.model(ids).logits)
    qw = loaded.model.model.layers[0].mlp.up_proj.quantized_weight()
    assert qw.tensors["zeros"].dtype == torch.float16 and not torch.equal(qw.tensors["zeros"], qw.tensors["zeros"].round())
    x = torch.randn(5, qw.shape[1])
    want = reference.qlinear(x, qw, None)
    assert cpu_packed.supports(qw)  # tinygemm takes real zero points: (q - 8)·s + (8 - z)·s, bf16 scales
    packed = prepare(qw, "cpu_packed")
    assert torch.allclose(packed(x, None), want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert torch.allclose(dense.DenseWeight(qw, torch.float32)(x, None), want, rtol=1e-5, atol=1e-5)


def test_exports_that_take_integer_zero_points_refuse_real_ones(tiny_bundle, tmp_path):
    q = qd.quantize(tiny_bundle, qd.HalfQuadConfig(bits=4, group_size=32))
    qd.save(q, tmp_path / "hq")
    for fmt in ("compressed-tensors", "awq"):
        with pytest.raises(CheckpointError, match="integer zero points"):
            qd.export(tmp_path / "hq", tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
