"""The CPU W8A8 path computes what the reference computes, bit for bit, with the weight made once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy import kernels
from quantdeploy.errors import ConfigError
from quantdeploy.kernels import cpu_w8a8, reference
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

W8A8 = QuantSpec("int8", None, activations="int8")


@settings(max_examples=20, deadline=None)
@given(rows=st.sampled_from([1, 2, 3, 8, 17]), n=st.sampled_from([8, 40, 96]), k=st.sampled_from([16, 64, 576, 1100, 2100]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(), route=st.sampled_from(cpu_w8a8.ROUTES),
       seed=st.integers(0, 2**16))
def test_equals_the_reference_bit_for_bit(rows, n, k, dtype, bias, route, seed):
    """Every route (int8 codes through torch._int_mm, the default with AVX-512; through our int8_mm, exact
    int32 sums; held in fp32 and summed exactly) gives the reference's bits, whichever route the reference
    takes here."""
    if route == "native":
        k = 32 * (k // 32 + 1)  # our kernel takes K in blocks of 32
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g), W8A8)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    prepared = cpu_w8a8.CPUW8A8(qw, route)
    assert prepared.read_bytes == n * k * (4 if route == "fp32" else 1) + 4 * n
    assert torch.equal(prepared(x, b), reference.qlinear(x, qw, b))
    assert torch.equal(prepared(x.reshape(rows, 1, k), b), reference.qlinear(x.reshape(rows, 1, k), qw, b))


def test_auto_takes_the_route_of_this_cpu():
    prepared = kernels.prepare(quantize_weight(torch.randn(32, 64), W8A8))
    assert isinstance(prepared, cpu_w8a8.CPUW8A8) and prepared.backend == "cpu_packed"
    assert prepared.route == ("int_mm" if reference.CPU_AVX512 else "native")  # this CPU: AVX2 at least
    assert cpu_w8a8.default_route(48) == ("int_mm" if reference.CPU_AVX512 else "fp32")  # K not in blocks of 32


def test_named_backends():
    qw = quantize_weight(torch.randn(32, 64), W8A8)
    assert isinstance(kernels.prepare(qw, "cpu_packed"), cpu_w8a8.CPUW8A8)
    assert kernels.prepare(qw, "reference") is None
    with pytest.raises(ConfigError, match="dense backend cannot run"):
        kernels.prepare(qw, "dense")
    assert not cpu_w8a8.supports(quantize_weight(torch.randn(32, 64), QuantSpec("int8", None)))  # weight-only


def test_traces_in_one_graph():
    """A compiled decode step (fullgraph) holds the W8A8 layer: the CPU feature query stays out of the trace."""
    qw = quantize_weight(torch.randn(48, 64), W8A8)
    routes = [cpu_w8a8.CPUW8A8(qw, route) for route in cpu_w8a8.ROUTES]
    x = torch.randn(3, 64)
    for fn in [lambda x, p=p: p(x, None) for p in routes] + [lambda x: reference.qlinear(x, qw, None)]:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), fn(x))
