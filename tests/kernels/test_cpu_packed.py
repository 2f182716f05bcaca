"""PyTorch's packed CPU kernels against the reference path (the oracle)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy import kernels
from quantdeploy.engine import QuantLinear
from quantdeploy.errors import ConfigError
from quantdeploy.kernels import cpu_packed, reference
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

PACKED = [QuantSpec("int8", None), QuantSpec("int4", 32), QuantSpec("int4", 64, symmetric=False),
          QuantSpec("int4", 128), QuantSpec("int4", 256, symmetric=False),
          # groups the kernel does not take, split into sub-groups it does (96 = 3 x 32, 384 = 3 x 128)
          QuantSpec("int4", 96), QuantSpec("int4", 384, symmetric=False), QuantSpec("int4", None)]


BF16_TOL = 6e-3  # three bf16 roundings (input, scale, output) of 2^-9 relative each


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@settings(max_examples=20, deadline=None)
@given(spec=st.sampled_from(PACKED), n=st.integers(1, 6).map(lambda i: 16 * i), m=st.integers(1, 9),
       seed=st.integers(0, 2**16), bias=st.booleans())
def test_packed_kernels_match_the_reference(spec, n, m, seed, bias):
    g = torch.Generator().manual_seed(seed)
    k = 768  # divides by every group above
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    qw = quantize_weight(w, spec)
    prepared = kernels.prepare(qw, "cpu_packed")
    assert prepared is not None and prepared.backend == "cpu_packed"
    # bf16 activations, scales and output on this path (see cpu_packed's docstring): bf16-level agreement
    assert _rel(prepared(x, b), reference.qlinear(x, qw, b)) < BF16_TOL


def test_quant_linear_prepare_uses_the_packed_kernel_and_keeps_its_state_dict():
    qw = quantize_weight(torch.randn(64, 256), QuantSpec("int4", 64, symmetric=False))
    layer = QuantLinear.from_quantized(qw, torch.randn(64), torch.float32)
    x = torch.randn(3, 7, 256)
    before = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare("cpu_packed") == "cpu_packed"
    assert _rel(layer(x), before) < BF16_TOL
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    layer.to("cpu")  # a move drops the repacked copy: it belongs to the old device
    assert layer.prepared is None


@pytest.mark.parametrize("spec", [QuantSpec("nf4", 64), QuantSpec("int4", 16), QuantSpec("int4", 48),
                                  QuantSpec("int8", 64, symmetric=False)])
def test_auto_holds_a_weight_only_spec_without_a_kernel_dense_and_a_named_backend_refuses(spec):
    qw = quantize_weight(torch.randn(32, 384), spec)
    assert not cpu_packed.supports(qw)
    assert kernels.prepare(qw).backend == "dense"  # kernels/dense.py, tested in test_dense.py
    with pytest.raises(ConfigError, match="cpu_packed backend cannot run"):
        kernels.prepare(qw, "cpu_packed")


def test_auto_holds_fp8_w8a8_dense_on_the_cpu_and_cpu_packed_refuses_it():
    qw = quantize_weight(torch.randn(32, 384), QuantSpec("fp8_e4m3", None, activations="fp8_e4m3"))
    assert kernels.prepare(qw).backend == "dense"  # the tokens still rounded to E4M3: test_dense.py
    assert kernels.prepare(qw, "reference") is None
    with pytest.raises(ConfigError, match="cpu_packed backend cannot run"):
        kernels.prepare(qw, "cpu_packed")


@settings(max_examples=25, deadline=None)
@given(blocks=st.lists(st.sampled_from([16, 32, 64]), min_size=1, max_size=5), k=st.sampled_from([32, 64, 96, 576]),
       seed=st.integers(0, 2**16))
def test_unpack_int4_inverts_the_kernel_layout_of_this_cpu(blocks, k, seed):
    n = sum(blocks)  # any multiple of 16: whole blocks of the vector width and a shorter last one
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(cpu_packed.unpack_int4(packed, n, k), codes.to(torch.uint8))
    assert torch.equal(cpu_packed.unpack_int4(packed, n, k, torch.float32), codes.float())


@pytest.mark.parametrize("spec", PACKED)
def test_from_dense_from_rows_a_call_takes_the_dense_route_and_matches_the_reference(spec):
    g = torch.Generator().manual_seed(1)
    qw = quantize_weight(torch.randn(48, 768, generator=g), spec)
    prepared = kernels.prepare(qw, "cpu_packed")
    assert prepared.dense_from == cpu_packed.DENSE_FROM_ROWS[spec.dtype]  # the layout was recognised
    m = prepared.dense_from
    x, b = torch.randn(m, 768, generator=g), torch.randn(48, generator=g)
    ref = reference.qlinear(x, qw, b)
    assert _rel(prepared(x, b), ref) < BF16_TOL
    assert torch.equal(prepared(x, b), (prepared.dense(x) + b).to(x.dtype))
    few = x[: m - 1]
    assert torch.equal(prepared(few, None), prepared.kernel(few).float())
    if spec.dtype == "int8":  # fp32 activations and scales on the dense route: the reference's numbers
        assert _rel(prepared(x, b), ref) < 1e-5
    else:  # the kernel's own weights (bf16 scales and zeros), multiplied in fp32
        w = prepared.dequantize(torch.float32)
        assert _rel(w, dequantize_weight(qw)) < 4e-3
        assert _rel(prepared.kernel(x[:8]).float(), x[:8] @ w.T) < BF16_TOL
