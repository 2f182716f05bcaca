"""The accuracy budget: the path of moves from the measured sensitivities, and the bisection on real
validation measurements (tiny Llama), from the API and the command line."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.quant.mixed.progressive import moves, progressive, upper_bound
from quantdeploy.quant.mixed.sensitivity import KEEP, Sensitivity, measure
from quantdeploy.quant.spec import QuantSpec

SPECS = {"int8": QuantSpec(dtype="int8", group_size=None), "int4": QuantSpec(dtype="int4", group_size=32),
         "int3": QuantSpec(dtype="int3", group_size=32)}


def test_the_path_moves_one_layer_one_rung_at_a_time_the_most_robust_first():
    bits = {KEEP: 16.0, "int8": 8.5, "int4": 4.5, "int3": 3.5}
    sens = Sensitivity(cost={"robust": {KEEP: 0.0, "int8": 0.001, "int4": 0.01, "int3": 0.05},
                             "fragile": {KEEP: 0.0, "int8": 0.01, "int4": 0.5, "int3": 2.0}},
                       bits={"robust": bits, "fragile": bits}, numel={"robust": 10, "fragile": 10}, specs={})
    path = moves(sens)
    assert len(path) == 6
    assert path[0] == ("robust", "int8") and path[-1] == ("fragile", "int3")
    ladder = [KEEP, "int8", "int4", "int3"]
    seen = {"robust": 0, "fragile": 0}
    for name, option in path:
        seen[name] += 1
        assert ladder[seen[name]] == option


def _sensitivities(model):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    torch.manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (4, 32))
    return measure(model, tokens[:2], {n: dict(SPECS) for n in names}), tokens[2:]


def test_the_accuracy_budget_keeps_the_longest_prefix_within_tolerance(tiny_bundle):
    model = tiny_bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens, validation = _sensitivities(model)
    everything = progressive(model, sens, validation, max_kld=1e9, max_ppl_increase=None)
    assert set(everything.choice.values()) == {"int3"} and everything.average_bits < 4
    nothing = progressive(model, sens, validation, max_kld=1e-12, max_ppl_increase=None)
    assert set(nothing.choice.values()) == {KEEP} and nothing.measured_kld == 0.0
    middle_tolerance = everything.measured_kld / 4
    middle = progressive(model, sens, validation, max_kld=middle_tolerance, max_ppl_increase=None)
    assert middle.measured_kld <= middle.kld_bound <= middle_tolerance  # the bound is what is held
    assert everything.average_bits < middle.average_bits < 32
    steps = [p["step"] for p in middle.path]
    assert steps == sorted(steps) and len(steps) <= 1 + len(moves(sens)).bit_length() + 1
    chosen = max(p["step"] for p in middle.path if p["kld_bound"] <= middle_tolerance)
    assert all(p["kld_bound"] > middle_tolerance for p in middle.path if p["step"] == chosen + 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_max_kld_on_the_command_line_reports_the_path(tiny_llama_dir, data, tmp_path, capsys):
    import json

    from quantdeploy import cli

    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--max-kld", "0.05", "--calib",
                     str(data / "text" / "wiki_en.train.txt"), "-o", str(tmp_path / "q")])
    assert code == 0
    out = capsys.readouterr().out
    assert "validation KLD" in out and "step" in out
    record = json.loads((tmp_path / "q" / "quant_config.json").read_text())["mixed"]["progressive"]
    assert record["measured_kld"] <= 0.05 and record["path"]
    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--max-kld", "0.05", "--bits-budget", "4",
                     "--calib", str(data / "text" / "wiki_en.train.txt"), "-o", str(tmp_path / "both")])
    assert code == 2 and "one budget" in capsys.readouterr().err


def test_the_upper_bound_is_the_mean_plus_1645_standard_errors():
    values = torch.tensor([0.01, 0.03, 0.02, 0.06], dtype=torch.float64)
    expected = values.mean() + 1.645 * values.std() / 2  # 4 windows: the standard error is std / 2
    assert upper_bound(values) == pytest.approx(float(expected))
    assert upper_bound(torch.full((8,), 0.02, dtype=torch.float64)) == pytest.approx(0.02)  # no spread, no margin
    assert upper_bound(torch.tensor([0.05], dtype=torch.float64)) == pytest.approx(0.05)
