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


def test_embedding_lookup():
    torch.manual_seed(0)
    table = torch.randn(100, 64)
    qw = quantize_weight(table, QuantSpec("int4", 32))
    emb = QuantEmbedding.from_quantized(qw, torch.float32)
    ids = torch.tensor([[0, 5, 99]])
    torch.testing.assert_close(emb(ids), dequantize_weight(qw)[ids])


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
