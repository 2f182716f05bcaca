"""AWQ: the Gram-matrix searches against direct computation, exact scale folding, and the method."""

import json

import torch

import quantdeploy as qd
from quantdeploy.quant.awq_search import apply_clip, output_error, scale_gram, search_clip, search_scales
from quantdeploy.quant.smoothing import fold_scales
from quantdeploy.quant.primitives import fake_quantize
from quantdeploy.quant.spec import QuantSpec


def outlier_inputs(seed=0, rows=2048, n=128, out=96):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g)
    X[:, :3] *= 25  # salient channels
    W = torch.randn(out, n, generator=g) * 0.05
    return X, W


def test_gram_error_equals_activation_error():
    X, W = outlier_inputs()
    D = W - fake_quantize(W, QuantSpec("int4", 32))
    G = X.T @ X / X.shape[0]
    direct = float(((X @ D.T) ** 2).sum() / X.shape[0])
    assert abs(output_error(D, G) - direct) <= 1e-4 * direct
    s = torch.rand(128) + 0.5
    torch.testing.assert_close(scale_gram(G, s), (X / s).T @ (X / s) / X.shape[0], rtol=1e-4, atol=1e-4)


def test_scale_search_protects_salient_channels():
    X, W = outlier_inputs(1)
    G = X.T @ X / X.shape[0]
    spec = QuantSpec("int3", 32)
    q = lambda w: fake_quantize(w, spec)  # noqa: E731
    s, rel = search_scales(G, X.abs().mean(0), [W], q, 32)
    plain = output_error(W - q(W), G)
    scaled = output_error(W - q(W * s) / s, G)
    assert scaled < 0.8 * plain
    assert rel == scaled / output_error(W, G)
    assert s[:3].mean() > s[3:].mean()  # the outlier channels are scaled up


def test_clip_search_never_widens_and_lowers_group_error():
    X, W = outlier_inputs(2)
    W[:, 5] *= 8  # a weight outlier that clipping should trim
    G = X.T @ X / X.shape[0]
    spec = QuantSpec("int3", 32)
    q = lambda w: fake_quantize(w, spec)  # noqa: E731
    best = search_clip(G, W, q, 32)
    org = W.abs().reshape(96, 4, 32).amax(-1)
    assert (best <= org + 1e-7).all() and (best < org).any()
    clipped = apply_clip(W, best, 32)
    assert output_error(W - q(clipped), G) < output_error(W - q(W), G)


def test_folding_scales_keeps_the_float_model_unchanged(tiny_bundle):
    import copy

    model = copy.deepcopy(tiny_bundle.model)
    block = model.model.layers[0]
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
        g = torch.Generator().manual_seed(0)
        fold_scales(block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
                    torch.rand(64, generator=g) + 0.5)
        fold_scales(block.mlp.up_proj, [block.mlp.down_proj], torch.rand(128, generator=g) + 0.5)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_then_rtn_or_gptq_on_tiny_llama(tiny_bundle, data, tmp_path):
    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=4, seq_len=64)
    for quantizer in (qd.RTNConfig(bits=4, group_size=32), qd.GPTQConfig(bits=4, group_size=32)):
        config = qd.AWQConfig(quantizer=quantizer, calibration=calib)
        a, b = qd.quantize(tiny_bundle, config), qd.quantize(tiny_bundle, config)
        norm_a = a.model.model.layers[0].input_layernorm.weight
        assert torch.equal(norm_a, b.model.model.layers[0].input_layernorm.weight)
        assert not torch.equal(norm_a, tiny_bundle.model.model.layers[0].input_layernorm.weight)  # scales folded
        assert torch.equal(a.model.model.layers[1].mlp.down_proj.qweight, b.model.model.layers[1].mlp.down_proj.qweight)
    qd.save(a, tmp_path / "awq")
    qc = json.loads((tmp_path / "awq" / "quant_config.json").read_text())
    assert qc["method"]["type"] == "awq" and qc["method"]["quantizer"]["type"] == "gptq"
    assert qd.AWQConfig.from_dict(qc["method"]) == config
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(qd.load(tmp_path / "awq").model(ids).logits, a.model(ids).logits)
