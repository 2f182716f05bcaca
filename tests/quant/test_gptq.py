"""GPTQ: the solver against round-to-nearest on layers with outlier inputs, and the method end to end."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantdeploy as qd
from quantdeploy.quant.gptq_solver import gptq_quantize, hessian_update
from quantdeploy.quant.primitives import dequantize_weight, pack_affine, quantize_weight
from quantdeploy.quant.spec import QuantSpec


def layer_with_outliers(seed: int, out: int = 64, n: int = 128, rows: int = 512):
    """Weights and inputs where a few input channels are large, as in real transformer activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g)
    X[:, torch.randperm(n, generator=g)[:4]] *= 15
    X = X @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)  # correlated channels
    W = torch.randn(out, n, generator=g) * 0.05
    return W, X


def output_error(W, Wq, X):
    return float(((X @ W.T - X @ Wq.T) ** 2).mean())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1000), bits=st.sampled_from([3, 4]), symmetric=st.booleans(),
       group=st.sampled_from([32, 128]), act_order=st.booleans())
def test_gptq_beats_rtn_on_output_error(seed, bits, symmetric, group, act_order):
    W, X = layer_with_outliers(seed)
    H, _ = hessian_update(torch.zeros(128, 128), X, 0)
    spec = QuantSpec(f"int{bits}", group, symmetric)
    codes, scales, zeros = gptq_quantize(W, H, bits, group, symmetric, act_order=act_order)
    gptq = dequantize_weight(pack_affine(codes, scales, zeros, spec))
    rtn = dequantize_weight(quantize_weight(W, spec))
    assert output_error(W, gptq, X) < 0.8 * output_error(W, rtn, X)


def test_static_groups_keep_the_natural_layout():
    """With act-order, each group's scale comes from its natural columns: plain dequantization works."""
    W, X = layer_with_outliers(3)
    H, _ = hessian_update(torch.zeros(128, 128), X, 0)
    codes, scales, zeros = gptq_quantize(W, H, 4, 32, True, act_order=True)
    rtn = quantize_weight(W, QuantSpec("int4", 32))
    assert torch.equal(scales, rtn.tensors["scales"])  # chosen from the original weights, per natural group
    assert codes.shape == W.shape and int(codes.max()) <= 15


def test_deterministic_and_dead_inputs_are_safe():
    W, X = layer_with_outliers(5)
    X[:, :3] = 0  # inputs that never fire
    H, _ = hessian_update(torch.zeros(128, 128), X, 0)
    a = gptq_quantize(W, H, 4, 32, False)
    b = gptq_quantize(W, H, 4, 32, False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    deq = dequantize_weight(pack_affine(*a, QuantSpec("int4", 32, False)))
    assert torch.isfinite(deq).all() and (deq[:, :3] == 0).all()


def test_hessian_running_mean_matches_direct():
    X = torch.randn(300, 16)
    H, n = torch.zeros(16, 16), 0
    for chunk in X.split(70):
        H, n = hessian_update(H, chunk, n)
    torch.testing.assert_close(H, 2 * X.T @ X / 300, rtol=1e-5, atol=1e-5)
    assert n == 300


def calib(path, samples=8, seq_len=64):
    return qd.CalibrationConfig(source=str(path), num_samples=samples, seq_len=seq_len)


def test_gptq_on_tiny_llama_is_deterministic_and_saved_with_its_calibration_hash(tiny_bundle, data, tmp_path):
    config = qd.GPTQConfig(bits=4, group_size=32, calibration=calib(data / "text" / "wiki_en.train.txt"))
    a = qd.quantize(tiny_bundle, config)
    b = qd.quantize(tiny_bundle, config)
    for (name, ma), mb in zip(qd.pipeline.quantized_modules(a.model).items(), qd.pipeline.quantized_modules(b.model).values()):
        assert torch.equal(ma.qweight, mb.qweight) and torch.equal(ma.scales, mb.scales), name
    assert set(a.quant_config["modules"]) == set(qd.quantize(tiny_bundle, qd.RTNConfig(group_size=32)).quant_config["modules"])
    qd.save(a, tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["calibration_sha256"] == a.quant_config["calibration"]["sha256"]
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(qd.load(tmp_path / "g").model(ids).logits, a.model(ids).logits)
    assert not torch.equal(a.model.model.layers[1].mlp.down_proj.qweight,
                           qd.quantize(tiny_bundle, qd.RTNConfig(group_size=32)).model.model.layers[1].mlp.down_proj.qweight)


def test_lm_head_outside_blocks_falls_back_to_rtn_and_says_so(tiny_bundle, data, caplog):
    config = qd.GPTQConfig(bits=8, group_size=None, calibration=calib(data / "text" / "wiki_en.train.txt", 2),
                           targets=qd.TargetConfig(lm_head=True))
    with caplog.at_level("INFO"):
        q = qd.quantize(tiny_bundle, config)
    assert "lm_head" in q.quant_config["modules"] and "outside the decoder blocks" in caplog.text


def test_true_sequential_stages_follow_the_block(tiny_bundle):
    from quantdeploy.quant.sequential import BlockRunner, capture_block_inputs

    block = tiny_bundle.model.model.layers[0]
    hidden, kwargs = capture_block_inputs(tiny_bundle.model, torch.randint(0, 300, (2, 16)), torch.device("cpu"), 1)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    stages = BlockRunner(block, hidden, kwargs).input_groups(linears)
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_reusing_finished_layers_changes_nothing_and_computes_each_layer_once(tiny_bundle, monkeypatch):
    """BlockRunner keeps the outputs of layers whose weights are final; a true-sequential GPTQ block
    then gives bit-identical results to recomputing everything, with each layer run once per batch."""
    import copy

    from quantdeploy.quant.methods import gptq
    from quantdeploy.quant.sequential import BlockRunner, capture_block_inputs

    hidden, kwargs = capture_block_inputs(tiny_bundle.model, torch.randint(0, 300, (3, 16)), torch.device("cpu"), 1)
    results = {}
    for memo_bytes in (2**30, 0):
        block = copy.deepcopy(tiny_bundle.model.model.layers[0])
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        calls = dict.fromkeys(linears, 0)
        names = {m: n for n, m in linears.items()}
        for m in linears.values():  # count the matmuls each layer really computes
            monkeypatch.setattr(m, "forward", lambda x, m=m: (calls.__setitem__(names[m], calls[names[m]] + 1),
                                                              torch.nn.functional.linear(x, m.weight, m.bias))[1])
        runner = BlockRunner(block, hidden, kwargs, memo_bytes=memo_bytes)
        specs = {n: QuantSpec("int4", 32, True) for n in linears}
        weights = gptq.quantize_block(qd.GPTQConfig(bits=4, group_size=32), linears, specs, runner)
        outputs = runner.run()
        runner.restore()
        assert all(vars(m).get("forward") is None or m in names for m in block.modules())  # unwrapped
        results[memo_bytes] = (weights, outputs, calls)
    (w1, out1, calls1), (w0, out0, calls0) = results.values()
    assert all(torch.equal(w1[n].tensors["qweight"], w0[n].tensors["qweight"]) for n in w1)
    assert all(torch.equal(a, b) for a, b in zip(out1, out0))
    # one input-grouping batch, then each layer once per batch (3 batches) with reuse; more without
    assert all(c == 1 + 3 for c in calls1.values()), calls1
    assert calls0["self_attn.q_proj"] > 1 + 3
