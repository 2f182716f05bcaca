"""SmoothQuant W8A8 and FP8 W8A8: the integer reference path, per-token activation quantization,
smoothing scales on outlier activations, and the method on a tiny Llama."""

import pytest
import torch

import quantdeploy as qd
from quantdeploy.engine import QuantLinear
from quantdeploy.errors import ConfigError
from quantdeploy.quant.methods.smoothquant import smoothing_scales
from quantdeploy.quant.primitives import dequantize_weight, int8_weight, quantize_activations, quantize_weight
from quantdeploy.quant.spec import QuantSpec

W8A8 = QuantSpec("int8", None, True, activations="int8")


def outliers(seed=0, tokens=64, k=128, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :4] *= 40  # activation outlier channels, as in LLMs
    return x, torch.randn(n, k, generator=g) * 0.05


def test_per_token_activation_quantization_bound():
    x, _ = outliers()
    for dtype, tol in (("int8", None), ("fp8_e4m3", 2**-4)):
        q, s = quantize_activations(x, dtype)
        deq = q.float() * s
        if tol is None:
            assert q.dtype == torch.int8 and ((x - deq).abs() <= s / 2 + 1e-6).all()
        else:
            assert q.dtype == torch.float8_e4m3fn and ((x - deq).abs() <= x.abs() * tol + s * 2**-10).all()


def test_int8_path_multiplies_integers_exactly():
    x, w = outliers(1)
    qw = quantize_weight(w, W8A8)
    layer = QuantLinear.from_quantized(qw, None, torch.float32)
    xq, xs = quantize_activations(x, "int8")
    wq, ws = int8_weight(qw)
    exact = (xq.long() @ wq.long().T).double() * xs.double() * ws.double()  # int64 products, no rounding
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-6, atol=1e-5)
    ref = x @ w.T
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.05


def test_smoothing_moves_outliers_into_weights_and_cuts_error():
    x, w = outliers(2)
    ref = x @ w.T

    def w8a8_error(s):
        layer = QuantLinear.from_quantized(quantize_weight(w * s, W8A8), None, torch.float32)
        return float((layer(x / s) - ref).norm() / ref.norm())

    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
    assert s[:4].min() > s[4:].max()
    assert w8a8_error(s) < 0.7 * w8a8_error(torch.ones(128))


def test_fp8_w8a8_reference_is_close_to_float():
    x, w = outliers(3)
    spec = QuantSpec("fp8_e4m3", None, activations="fp8_e4m3")
    layer = QuantLinear.from_quantized(quantize_weight(w, spec), None, torch.float32)
    ref = x @ w.T
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.06
    assert qd.FP8Config(activations=True).base_spec() == spec


def test_spec_rules():
    with pytest.raises(ConfigError, match="per-channel"):
        QuantSpec("int8", 64, True, activations="int8")
    with pytest.raises(ConfigError, match="per-channel"):
        QuantSpec("int4", None, True, activations="int8")
    with pytest.raises(ConfigError, match="alpha"):
        qd.SmoothQuantConfig(alpha=1.5)


def test_smoothquant_on_tiny_llama_roundtrips(tiny_bundle, data, tmp_path):
    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=4, seq_len=64)
    q = qd.quantize(tiny_bundle, qd.SmoothQuantConfig(alpha=0.5, calibration=calib))
    specs = {m["spec"] for m in qd.describe(q)["modules"]}
    assert specs == {"int8-sym-per-channel-a8"}
    ln = q.model.model.layers[0].post_attention_layernorm.weight
    assert not torch.equal(ln, tiny_bundle.model.model.layers[0].post_attention_layernorm.weight)
    qd.save(q, tmp_path / "sq")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        got, ref = qd.load(tmp_path / "sq").model(ids).logits, tiny_bundle.model(ids).logits
        assert torch.equal(got, q.model(ids).logits)
    p, r = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    assert float((p.exp() * (p - r)).sum(-1).mean()) < 0.05
