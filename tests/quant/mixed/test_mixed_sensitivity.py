"""Sensitivity measured on the tiny Llama, mixed-precision quantization end to end (plan, checkpoint,
engine, CLI), and the rank correlation helper."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.quant.mixed.sensitivity import KEEP, measure, spearman
from quantdeploy.quant.spec import QuantSpec

INT8, INT3 = QuantSpec(dtype="int8", group_size=None), QuantSpec(dtype="int3", group_size=32)
INT4 = QuantSpec(dtype="int4", group_size=32)


def test_sensitivity_costs_layers_alone_and_puts_every_weight_back(tiny_bundle):
    model = tiny_bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    torch.manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (2, 32))
    sens = measure(model, tokens, {n: {"int8": INT8, "int4": INT4, "int3": INT3} for n in names})
    for name in names:
        assert sens.cost[name][KEEP] == 0.0 and sens.bits[name][KEEP] == 32.0  # the tiny model is fp32
        assert 0.0 <= sens.cost[name]["int8"] < sens.cost[name]["int4"] < sens.cost[name]["int3"]
        assert sens.bits[name]["int3"] == pytest.approx(3 + 16 / 32)  # codes + an fp16 scale per 32
        assert sens.bits[name]["int8"] > 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spearman_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


def test_a_bit_budget_gives_a_mixed_checkpoint_that_loads_and_runs(tiny_bundle, data, tmp_path):
    import quantdeploy as qd
    from quantdeploy.engine.engine import Engine
    from quantdeploy.engine.sampling import SamplingParams

    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=2, seq_len=64)
    mixed = qd.MixedConfig(bits_budget=6.0, candidates=(INT8, QuantSpec(dtype="int4", group_size=32)),
                           calibration=calib)
    q = qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32), mixed=mixed)
    record = q.quant_config["mixed"]
    assert record["allocation"]["average_bits"] <= 6.0
    assert record["measured_kld"] > 0 and record["allocation"]["predicted_kld"] > 0
    specs = {s["dtype"] for s in q.quant_config["modules"].values()}
    assert specs == {"int8", "int4"}, specs  # at 6 bits between int4 (4.5) and int8 (~8.5): both used
    qd.save(q, tmp_path / "ckpt")
    loaded = qd.load(tmp_path / "ckpt")
    assert loaded.quant_config["modules"] == q.quant_config["modules"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    runs = [[c.token_ids for c in Engine.from_bundle(b, "cpu", max_batch=2, max_seq_len=64).generate(
        ["The history of", "A"], params)] for b in (q, loaded)]
    assert runs[0] == runs[1]


def test_bits_budget_on_the_command_line(tiny_llama_dir, data, tmp_path, capsys):
    import json

    from quantdeploy import cli

    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits-budget", "3.0", "--calib",
                     str(data / "text" / "wiki_en.train.txt"), "-o", str(tmp_path / "low")])
    assert code == 2 and "below the" in capsys.readouterr().err  # int3 g64 is 3.25 bits: one line, no output
    assert not (tmp_path / "low").exists()
    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits-budget", "5", "--calib",
                     str(data / "text" / "wiki_en.train.txt"), "-o", str(tmp_path / "q")])
    assert code == 0
    assert "mixed precision:" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert config["mixed"]["allocation"]["average_bits"] <= 5
    assert cli.main(["inspect", str(tmp_path / "q"), "--plots", str(tmp_path / "plots")]) == 0
    assert "plots:" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["bits_vs_kld.png", "sensitivity.png"]
    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits-budget", "5", "-o",
                     str(tmp_path / "nocalib")])
    assert code == 2 and "--bits-budget" in capsys.readouterr().err


def test_pinned_layers_take_their_option_and_count_against_the_budget(tiny_bundle, data):
    import quantdeploy as qd
    from quantdeploy.errors import ConfigError
    from quantdeploy.quant.mixed import plan_mixed

    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=2, seq_len=64)
    pins = (("layers\\.0\\.mlp", "int8-sym-per-channel"), ("layers\\.1\\.self_attn\\.[qk]_proj", "original"))
    config = qd.RTNConfig(bits=4, group_size=32)
    for budget in ({"bits_budget": 9.0}, {"max_kld": 1e-6}):  # a bit budget, and an accuracy budget
        mixed = qd.MixedConfig(candidates=(INT8, INT4), calibration=calib, pin=pins, **budget)
        specs, record = plan_mixed(tiny_bundle.model, tiny_bundle.tokenizer, config, mixed)
        for layer in ("gate_proj", "up_proj", "down_proj"):
            assert specs[f"model.layers.0.mlp.{layer}"] == INT8
        assert not {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"} & set(specs)
        sens = record["sensitivity"]
        assert set(sens["cost"]["model.layers.0.mlp.down_proj"]) == {"int8-sym-per-channel"}  # not searched
        assert set(sens["cost"]["model.layers.1.self_attn.q_proj"]) == {KEEP}
        if "allocation" in record:
            assert record["allocation"]["average_bits"] <= 9.0
            assert set(specs.values()) - {INT8} == {INT4}  # the unpinned layers fill the rest of the budget
        else:  # the walk starts from the pins (step 0: every other layer original) and moves only the others
            first = min(record["progressive"]["path"], key=lambda p: p["step"])
            assert first["average_bits"] > 8 and len(specs) >= 3
    with pytest.raises(ConfigError, match="matches no target layer"):
        plan_mixed(tiny_bundle.model, tiny_bundle.tokenizer, config,
                   qd.MixedConfig(bits_budget=5.0, calibration=calib, pin=(("no_such_layer", "original"),)))
    with pytest.raises(ConfigError, match="not a candidate"):
        qd.MixedConfig(bits_budget=5.0, pin=(("mlp", "int5"),))
    round_trip = qd.MixedConfig(bits_budget=5.0, candidates=(INT8, INT4), pin=pins)
    assert qd.MixedConfig.from_dict(round_trip.to_dict()) == round_trip  # as the manifest stores it


def test_pins_from_flags_and_from_a_recipe(tiny_llama_dir, data, tmp_path, capsys):
    import json

    from quantdeploy import cli

    calib = str(data / "text" / "wiki_en.train.txt")
    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits-budget", "6", "--calib", calib,
                     "--calib-samples", "2", "--pin", "down_proj=int8-sym-per-channel", "-o", str(tmp_path / "flags")])
    assert code == 0
    modules = json.loads((tmp_path / "flags" / "quant_config.json").read_text())["modules"]
    assert all(modules[f"model.layers.{i}.mlp.down_proj"]["dtype"] == "int8" for i in (0, 1))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: rtn\nmixed:\n  bits_budget: 20\n  pin:\n    'layers\\.1\\.': original\n")
    assert cli.main(["quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--calib", calib,
                     "--calib-samples", "2", "-o", str(tmp_path / "recipe")]) == 0
    modules = json.loads((tmp_path / "recipe" / "quant_config.json").read_text())["modules"]
    assert modules and not any(name.startswith("model.layers.1.") for name in modules)
    capsys.readouterr()
    assert cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits-budget", "6", "--calib", calib,
                     "--pin", "down_proj", "-o", str(tmp_path / "bad")]) == 2
    assert "--pin takes REGEX=OPTION" in capsys.readouterr().err
