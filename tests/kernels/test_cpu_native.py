"""Our CPU kernels (cpu_native.cpp) against the reference path (the oracle)."""

from __future__ import annotations

import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy import kernels
from quantdeploy.engine import QuantLinear
from quantdeploy.errors import ConfigError
from quantdeploy.kernels import cpu_native, reference
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the kernels are written for x86 (AVX2); other CPUs take PyTorch's packed ones")

NATIVE = [QuantSpec("int8", None), QuantSpec("int8", 32), QuantSpec("int8", 128), QuantSpec("int4", 32),
          QuantSpec("int4", 32, symmetric=False), QuantSpec("int4", 64, symmetric=False), QuantSpec("int4", 96),
          QuantSpec("int4", 128), QuantSpec("int4", 256, symmetric=False), QuantSpec("int4", None),
          QuantSpec("int4", None, symmetric=False)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _int16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What rounding the activations to int16 per block of 32 may cost each output: every activation moves by
    at most half a step, 1/65534 of its block's largest magnitude; the integer products are exact and the
    fp32 sums differ from the reference's in order only (the second term)."""
    m, k = x.shape
    block_max = x.abs().view(m, k // 32, 32).amax(-1).repeat_interleave(32, -1)
    return block_max @ w.abs().T / 65534 + 1e-5 * (x.abs() @ w.abs().T)


def test_the_kernels_build_on_this_machine():
    """CI and the dev machines are AVX2 x86 with a compiler: there the kernels must be there, not skipped."""
    assert cpu_native.unavailable() is None


@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(NATIVE), n=st.integers(1, 40), m=st.integers(1, 11), seed=st.integers(0, 2**16),
       bias=st.booleans(), outliers=st.booleans())
def test_native_kernels_match_the_reference(spec, n, m, seed, bias, outliers):
    g = torch.Generator().manual_seed(seed)
    k = 768  # divides by every group above
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    if outliers:  # LLM activations: a few channels hundreds of times the rest (each only spoils its block)
        x[:, torch.randint(0, k, (3,), generator=g)] *= 300.0
    b = torch.randn(n, generator=g) if bias else None
    qw = quantize_weight(w, spec)
    prepared = kernels.prepare(qw)
    assert prepared is not None and prepared.backend == "cpu_native"
    error = (prepared(x, b) - reference.qlinear(x, qw, b)).abs()
    assert (error <= _int16_bound(x, dequantize_weight(qw))).all()


@pytest.mark.parametrize("spec", [s for s in NATIVE if s.dtype == "int4" and 576 % s.group_for(576) == 0],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [1, 2, 3])
def test_few_rows_over_blocks_that_the_fma_chains_do_not_divide(spec, m):
    """One or two rows spread their blocks over four or two accumulators in turn: k = 576 (SmolLM2's
    hidden size) is 18 blocks, two left after the turns of four, groups of 64 and 96 across turns."""
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(40, 576, generator=g), torch.randn(m, 576, generator=g)
    qw = quantize_weight(w, spec)
    error = (kernels.prepare(qw)(x, None) - reference.qlinear(x, qw, None)).abs()
    assert (error <= _int16_bound(x, dequantize_weight(qw))).all()


@pytest.mark.parametrize("spec", NATIVE)
def test_the_kernel_layout_holds_exactly_the_checkpoints_weights(spec):
    qw = quantize_weight(torch.randn(24, 768, generator=torch.Generator().manual_seed(2)), spec)
    prepared = cpu_native.pack(qw)
    if spec.dtype == "int4":
        assert torch.equal(prepared.dequantize(torch.float32), dequantize_weight(qw))
    x = torch.eye(768)[:5]  # one-hot rows: each output is one weight (code 32767, scale 1/32767: a few roundings)
    assert torch.allclose(prepared.kernel(x), dequantize_weight(qw)[:, :5].T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [64, 256, 576, 768])
def test_the_kernel_order_interleaves_each_chunk_of_eight_blocks_and_keeps_the_rest(k):
    order = cpu_native.kernel_order(k)
    assert torch.equal(order.sort().values, torch.arange(k))  # a permutation
    chunked = 256 * (k // 256)
    assert torch.equal(order[chunked:], torch.arange(chunked, k))
    if chunked:  # stored vector v (16 lanes): lane p holds value 2v + p % 2 of block p // 2
        v, p = 3, torch.arange(16)
        assert torch.equal(order[16 * v: 16 * v + 16], 32 * (p // 2) + 2 * v + p % 2)
    codes = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    assert torch.equal(cpu_native.unpack_int4(cpu_native.repack_int4(codes)), codes)


def test_repack_int4_puts_weight_j_and_16_plus_j_in_one_byte():
    """Blocks past the chunks (here k = 64: no chunk) keep one byte per weights j and 16 + j."""
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = cpu_native.repack_int4(codes)
    assert packed.shape == (1, 32)
    assert [int(v) for v in packed[0, :3]] == [0 | (0 << 4), 1 | (1 << 4), 2 | (2 << 4)]  # weights 16-18 = 0-2
    assert torch.equal(packed[0] & 15, torch.cat([codes[0, :16], codes[0, 32:48]]))
    assert torch.equal(packed[0] >> 4, torch.cat([codes[0, 16:32], codes[0, 48:]]))


@pytest.mark.parametrize("spec", [QuantSpec("int8", None), QuantSpec("int4", 64, symmetric=False)])
def test_from_dense_from_rows_a_call_takes_the_dense_fp32_route(spec):
    g = torch.Generator().manual_seed(1)
    qw = quantize_weight(torch.randn(384, 768, generator=g), spec)
    prepared = kernels.prepare(qw)
    m = prepared.dense_from
    assert m == cpu_native.DENSE_FROM_ROWS[spec.dtype]
    x, b = torch.randn(m, 768, generator=g), torch.randn(384, generator=g)
    assert torch.equal(prepared(x, b), prepared.dense(x) + b)
    assert _rel(prepared(x, b), reference.qlinear(x, qw, b)) < 1e-5  # fp32 weights and activations
    assert torch.equal(prepared(x[: m - 1], None), prepared.kernel(x[: m - 1]))
    with torch.inference_mode():  # as the engine runs it: three blocks of 128 channels, BLAS in the workers
        assert torch.equal(prepared(x, b), prepared.dense(x) + b)


def test_bf16_activations_go_in_as_fp32_and_come_back_bf16():
    qw = quantize_weight(torch.randn(32, 256), QuantSpec("int4", 32))
    x = torch.randn(3, 256).to(torch.bfloat16)
    y = kernels.prepare(qw)(x, None)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), reference.qlinear(x.float(), qw, None)) < 1e-2  # the output's bf16 rounding


def test_the_op_runs_inside_a_compiled_graph_without_breaks():
    qw = quantize_weight(torch.randn(64, 256), QuantSpec("int8", None))
    layer = QuantLinear.from_quantized(qw, None, torch.float32)
    assert layer.prepare() == "cpu_native"
    x = torch.randn(2, 256)
    compiled = torch.compile(lambda t: layer(t).relu(), fullgraph=True)
    assert torch.allclose(compiled(x), layer(x).relu(), rtol=1e-5, atol=1e-6)


def test_unavailable_kernels_leave_auto_on_packed_ones_and_a_named_backend_refuses(monkeypatch):
    qw = quantize_weight(torch.randn(32, 256), QuantSpec("int4", 32))
    monkeypatch.setenv("QUANTDEPLOY_CPU_KERNELS", "packed")
    cpu_native.unavailable.cache_clear()
    try:
        assert kernels.prepare(qw).backend == "cpu_packed"
        with pytest.raises(ConfigError, match="cpu_native backend cannot run here: QUANTDEPLOY_CPU_KERNELS=packed"):
            kernels.prepare(qw, "cpu_native")
    finally:
        monkeypatch.delenv("QUANTDEPLOY_CPU_KERNELS")
        cpu_native.unavailable.cache_clear()
    assert kernels.prepare(qw).backend == "cpu_native"


@pytest.mark.parametrize("spec", [QuantSpec("nf4", 64), QuantSpec("int4", 16), QuantSpec("int8", 64, symmetric=False),
                                  QuantSpec("int8", None, activations="int8")])
def test_specs_without_our_kernel_are_refused_by_name(spec):
    qw = quantize_weight(torch.randn(32, 384), spec)
    assert not cpu_native.supports(qw)
    with pytest.raises(ConfigError, match="cpu_native backend cannot run"):
        kernels.prepare(qw, "cpu_native")
