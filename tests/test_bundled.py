"""The real bundled model (SmolLM2-135M-Instruct, from its GGUF): fidelity thresholds and round trips.

Marked slow (tens of seconds on 2 cores); CI runs them. The full 32,768-token numbers come from
``quantdeploy demo`` / ``quantdeploy eval``; here 8,192 tokens keep the run short.
"""

import pytest
import torch

import quantdeploy as qd
from quantdeploy.eval.fidelity import EvalProtocol, evaluate
from quantdeploy.eval.text import load_text, tokenize_prefix
from quantdeploy.models.gguf import cache_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokens(bundled_bundle, data):
    return tokenize_prefix(bundled_bundle.tokenizer, load_text(data / "text" / "wiki_en.test.txt"), 8192)


def test_bundled_model_is_converted_once_and_cached(bundled_bundle):
    assert bundled_bundle.source.kind == "gguf"
    folder = cache_root() / "gguf" / bundled_bundle.source.sha256[:32]
    assert (folder / ".complete").is_file() and (folder / "config.json").is_file()
    assert bundled_bundle.model.config.hidden_size == 576


def test_int8_per_channel_is_nearly_lossless_and_ordering_holds(bundled_bundle, tokens):
    models = {
        "int8": qd.quantize(bundled_bundle, qd.RTNConfig(bits=8, group_size=None)).model,
        "nf4": qd.quantize(bundled_bundle, qd.NF4Config()).model,
        "int4": qd.quantize(bundled_bundle, qd.RTNConfig(bits=4, group_size=64)).model,
    }
    res = evaluate(models, bundled_bundle.model, tokens, EvalProtocol(max_tokens=8192, window=1024))
    assert res["int8"]["kld_mean"] <= 0.005
    assert res["int8"]["top1_agreement"] > 0.95
    assert res["int8"]["kld_mean"] < res["nf4"]["kld_mean"] < res["int4"]["kld_mean"]
    assert 5 < res["original"]["ppl"] < 40  # a real trained model on English Wikipedia text


def test_default_group_is_fitted_to_the_576_wide_inputs(bundled_bundle):
    q = qd.quantize(bundled_bundle, qd.RTNConfig(bits=4, group_size=128))
    modules = q.quant_config["modules"]
    assert modules["model.layers.0.self_attn.q_proj"]["group_size"] == 96
    assert modules["model.layers.0.mlp.down_proj"]["group_size"] == 128


def test_real_checkpoint_roundtrip_generates_identically(bundled_bundle, tmp_path):
    q = qd.quantize(bundled_bundle, qd.RTNConfig(bits=4, group_size=64))
    text, ids = qd.generate(q, "What is the capital of France?", max_new_tokens=16, chat=True)
    size = qd.save(q, tmp_path / "int4")
    assert size < 0.45 * sum(p.numel() * 4 for p in bundled_bundle.model.parameters())
    loaded = qd.load(tmp_path / "int4")
    assert qd.generate(loaded, "What is the capital of France?", max_new_tokens=16, chat=True) == (text, ids)
    assert len(ids) > 0 and text.strip()
    x = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(q.model(x).logits, loaded.model(x).logits)


def test_gptq_and_awq_cut_kld_well_below_rtn_at_4_and_3_bits(bundled_bundle, tokens, data):
    """Issue 3's bar (at least 30% below RTN at the same spec), on 16 calibration samples and 4,096 tokens."""
    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=16, seq_len=512)
    models = {}
    for bits in (4, 3):
        rtn = qd.RTNConfig(bits=bits, group_size=64)
        models[f"rtn{bits}"] = qd.quantize(bundled_bundle, rtn).model
        models[f"gptq{bits}"] = qd.quantize(bundled_bundle, qd.GPTQConfig(bits=bits, group_size=64, calibration=calib)).model
        models[f"awq{bits}"] = qd.quantize(bundled_bundle, qd.AWQConfig(quantizer=rtn, calibration=calib)).model
    res = evaluate(models, bundled_bundle.model, tokens[:4096], EvalProtocol(max_tokens=4096, window=1024))
    for bits in (4, 3):
        for method in ("gptq", "awq"):
            assert res[f"{method}{bits}"]["kld_mean"] <= 0.7 * res[f"rtn{bits}"]["kld_mean"], (method, bits, res)


def test_smoothquant_w8a8_meets_the_kld_bar(bundled_bundle, data):
    """Issue 3's bar: SmoothQuant W8A8 (alpha searched per layer, int8 weights chosen by GPTQ, 16 x 512
    calibration tokens) at mean KLD <= 0.01 on the first 32,768 tokens of wiki_en.test.txt."""
    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=16, seq_len=512)
    config = qd.SmoothQuantConfig(quantizer=qd.GPTQConfig(bits=8, group_size=None), calibration=calib)
    q = qd.quantize(bundled_bundle, config)
    assert {m["spec"] for m in qd.describe(q)["modules"]} == {"int8-sym-per-channel-a8"}
    tokens = tokenize_prefix(bundled_bundle.tokenizer, load_text(data / "text" / "wiki_en.test.txt"), 32768)
    res = evaluate({"w8a8": q.model}, bundled_bundle.model, tokens, EvalProtocol(max_tokens=32768, window=1024))
    assert res["w8a8"]["kld_mean"] <= 0.01, res["w8a8"]
