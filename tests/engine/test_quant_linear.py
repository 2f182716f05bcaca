import pytest
import torch

from quantdeploy.engine import QuantEmbedding, QuantLinear
from quantdeploy.kernels import qlinear
from quantdeploy.errors import ConfigError
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec


@pytest.mark.parametrize("spec", [QuantSpec("int8", None), QuantSpec("int4", 32, symmetric=False),
                                  QuantSpec("nf4", 64, double_quant=True), QuantSpec("fp8_e4m3", None)])
def test_reference_forward_is_dequantize_then_matmul(spec):
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 128), torch.randn(48), torch.randn(3, 5, 128)
    qw = quantize_weight(w, spec)
    layer = QuantLinear.from_quantized(qw, b, torch.float32)
    expected = x @ dequantize_weight(qw).T + b
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert set(dict(layer.named_buffers())) == set(qw.tensors)


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32), QuantSpec("int4", 32, symmetric=False), QuantSpec("int8", None),
                                  QuantSpec("nf4", 64, double_quant=True), QuantSpec("nf4", 64, double_quant=False),
                                  QuantSpec("fp8_e4m3", None)], ids=lambda s: s.describe())
def test_embedding_lookup_dequantizes_the_rows_asked_for_exactly_as_the_table(spec):
    torch.manual_seed(0)
    table = torch.randn(300, 128)  # NF4 double quantization: scale blocks that span rows
    qw = quantize_weight(table, spec)
    emb = QuantEmbedding.from_quantized(qw, torch.float32)
    ids = torch.tensor([[0, 5, 299], [7, 7, 150]])
    assert torch.equal(emb(ids), dequantize_weight(qw)[ids])


def test_dtype_casts_are_refused_but_device_moves_work():
    qw = quantize_weight(torch.randn(8, 32), QuantSpec("fp8_e4m3", None))
    layer = QuantLinear.from_quantized(qw, None, torch.float32)
    layer.to("cpu")
    with pytest.raises(TypeError, match="would corrupt"):
        layer.to(torch.float16)
    assert layer.qweight.dtype == torch.float8_e4m3fn  # untouched


def test_unknown_backend_is_an_error():
    qw = quantize_weight(torch.randn(8, 32), QuantSpec("int8", None))
    with pytest.raises(ConfigError, match="unknown kernel backend 'triton-x'"):
        qlinear(torch.randn(2, 32), qw, backend="triton-x")


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layers_trace_whole_for_torch_compile(double_quant):
    """Issue 13: compiling the decode step of an NF4 checkpoint raised `Tensor.tolist() with non-integer
    tensor` in the double-quantization map (dynamo traced through its lru_cache). fullgraph=True fails on
    any graph break; the eager backend traces exactly what inductor would get, in a second."""
    from quantdeploy.quant.primitives import quantize_weight

    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(64, 128), QuantSpec(dtype="nf4", group_size=64, double_quant=double_quant))
    layer = QuantLinear.from_quantized(qw, None, torch.float32)
    layer.prepare()
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_int8_matmul_pads_the_rows_cuda_refuses():
    """Issue 13: torch._int_mm needs more than 16 rows on CUDA; W8A8 decode has 1-16. The padded product
    equals the plain one (run here on the CPU with the CUDA row minimum; the GPU test runs it there)."""
    from quantdeploy.kernels.reference import CUDA_INT_MM_MIN_ROWS, int_mm, int_mm_padded

    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    expected = a.int() @ b.int()
    assert torch.equal(int_mm_padded(a, b, CUDA_INT_MM_MIN_ROWS), expected)
    assert torch.equal(int_mm(a, b), expected)


@pytest.mark.parametrize("k", [64, 1024, 1025, 3000])
def test_int8_matmul_through_fp32_slices_is_exact_at_the_extremes(k):
    """The fp32 route (CPUs without AVX-512) sums slices of 1,024 products exactly: -128 x -128 everywhere
    puts every partial sum at its largest, 2^24 at a full slice."""
    from quantdeploy.kernels.reference import int_mm_fp32

    g = torch.Generator().manual_seed(k)
    for a, b in ((torch.full((2, k), -128, dtype=torch.int8), torch.full((k, 3), -128, dtype=torch.int8)),
                 (torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g),
                  torch.randint(-128, 128, (k, 7), dtype=torch.int8, generator=g))):
        assert torch.equal(int_mm_fp32(a, b), (a.long() @ b.long()).to(torch.int32))
