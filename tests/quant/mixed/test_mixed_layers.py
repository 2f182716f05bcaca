"""The search's layer quantizers: round to nearest, and GPTQ with Hessians of the unquantized model."""

from __future__ import annotations

import torch

from quantdeploy.quant.mixed.layers import OneShotGPTQ, round_to_nearest
from quantdeploy.quant.spec import QuantSpec

INT3 = QuantSpec(dtype="int3", group_size=32)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def _inputs(model, name, tokens):
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=tokens)
    hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_one_shot_gptq_shares_hessians_and_beats_rounding_on_the_layer_outputs(tiny_bundle):
    import quantdeploy as qd

    model = tiny_bundle.model
    names = _linears(model)
    torch.manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (4, 64))
    gptq = OneShotGPTQ(model, tokens, names, qd.GPTQConfig(bits=3, group_size=32))
    layers = [n.rsplit(".", 1)[-1] for n in gptq._alias]
    assert sorted(set(layers)) == ["k_proj", "up_proj", "v_proj"]  # each reads the input q_proj / gate_proj reads
    rtn = round_to_nearest(True)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        w = model.get_submodule(name).weight.data
        x = _inputs(model, name, tokens)
        qw, w_gptq = gptq(name, w, INT3)
        assert qw.spec == INT3 and w_gptq.dtype == w.dtype
        assert gptq(name, w, INT3)[1] is w_gptq  # solved once, then kept
        err_gptq = (x @ (w - w_gptq).T).norm()
        err_rtn = (x @ (w - rtn(name, w, INT3)[1]).T).norm()
        assert err_gptq < err_rtn, (name, float(err_gptq), float(err_rtn))


def test_a_gptq_accuracy_budget_searches_with_gptq_weights_and_measures_the_saved_model(tiny_bundle, data):
    import quantdeploy as qd

    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=2, seq_len=64)
    mixed = qd.MixedConfig(max_kld=0.05, candidates=(QuantSpec(dtype="int8", group_size=None), INT3),
                           calibration=calib, validation_samples=4)
    method = qd.GPTQConfig(bits=4, group_size=32, calibration=calib.replace(num_samples=4))
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    q = qd.quantize(tiny_bundle, method, mixed=mixed)
    record = q.quant_config["mixed"]
    assert record["layer_quantizer"].startswith("GPTQ")
    progress = record["progressive"]
    assert progress["kld_bound"] <= 0.05 and progress["path"]
    assert progress["shipped_kld"] >= 0 and "shipped_kld" not in progress["path"][0]
    assert q.quant_config["method"]["type"] == "gptq"
    for k, v in tiny_bundle.model.state_dict().items():  # the search put every weight back
        assert torch.equal(v, before[k]), k


def test_a_data_free_method_searches_with_the_weights_it_saves(tiny_bundle, data):
    """RTN and halfquad: the search quantizes each layer with the method's own handler, so the saved
    model measures on the validation windows what the search measured for the step it chose."""
    import pytest

    import quantdeploy as qd

    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=2, seq_len=64)
    fz = QuantSpec(dtype="int4", group_size=32, symmetric=False, float_zeros=True)
    for method, candidates in ((qd.RTNConfig(bits=4, group_size=32), (QuantSpec(dtype="int8", group_size=None), INT3)),
                               (qd.HalfQuadConfig(bits=4, group_size=32), (QuantSpec(dtype="int8", group_size=None), fz))):
        mixed = qd.MixedConfig(max_kld=0.05, candidates=candidates, calibration=calib, validation_samples=4)
        record = qd.quantize(tiny_bundle, method, mixed=mixed).quant_config["mixed"]
        assert record["layer_quantizer"].startswith(method.TYPE)
        progress = record["progressive"]
        assert progress["measured_kld"] > 0 and progress["average_bits"] < 32  # something was quantized
        assert progress["shipped_kld"] == pytest.approx(progress["measured_kld"], rel=1e-4, abs=1e-7)


def test_awq_scales_alone_keep_the_float_function(tiny_bundle):
    import copy

    import quantdeploy as qd
    from quantdeploy.quant.apply import plan
    from quantdeploy.quant.methods.awq import fold_awq_scales

    model = tiny_bundle.model
    torch.manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (4, 64))
    config = qd.AWQConfig(quantizer=qd.RTNConfig(bits=3, group_size=32))
    scaled = copy.deepcopy(model)
    fold_awq_scales(config, scaled, plan(scaled, config), tokens, torch.device("cpu"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(scaled.state_dict()[name], model.state_dict()[name])  # scales were folded
    with torch.no_grad():
        want, got = model(input_ids=tokens).logits, scaled(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_awq_gptq_bit_budget_searches_on_the_scaled_model_with_gptq_weights(tiny_bundle, data):
    import quantdeploy as qd

    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=2, seq_len=64)
    mixed = qd.MixedConfig(bits_budget=5.0, candidates=(QuantSpec(dtype="int8", group_size=None), INT3),
                           calibration=calib)
    method = qd.AWQConfig(quantizer=qd.GPTQConfig(bits=4, group_size=32),  # GPTQ runs on AWQ's windows
                          calibration=calib.replace(num_samples=4))
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    record = qd.quantize(tiny_bundle, method, mixed=mixed).quant_config["mixed"]
    assert record["layer_quantizer"].startswith("AWQ's scales, then GPTQ")
    assert record["allocation"]["average_bits"] <= 5.0 and record["measured_kld"] > 0
    for k, v in tiny_bundle.model.state_dict().items():  # the scales went into a copy
        assert torch.equal(v, before[k]), k
