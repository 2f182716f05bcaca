import logging

import pytest
import torch
from torch import nn

import quantdeploy as qd
from quantdeploy.errors import ConfigError
from quantdeploy.quant.apply import plan
from quantdeploy.quant.spec import fit_group_size
from quantdeploy.quant.targets import TargetConfig, select_targets


def test_lm_head_and_embeddings_are_left_out_by_default(tiny_bundle):
    names = select_targets(tiny_bundle.model, TargetConfig())
    assert "lm_head" not in names and all(isinstance(m, nn.Linear) for m in names.values())
    assert len(names) == 2 * 7
    names = select_targets(tiny_bundle.model, TargetConfig(lm_head=True, embeddings=True))
    assert "lm_head" in names and "model.embed_tokens" in names


def test_include_exclude_names_and_regex(tiny_bundle):
    model = tiny_bundle.model
    assert set(select_targets(model, TargetConfig(include=("q_proj",)))) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    chosen = select_targets(model, TargetConfig(include=(r"re:layers\.1\.",), exclude=("mlp.down_proj",)))
    assert all(".layers.1." in n for n in chosen) and "model.layers.1.mlp.down_proj" not in chosen
    assert len(chosen) == 6
    with pytest.raises(ConfigError, match="matches no module"):
        select_targets(model, TargetConfig(include=("nonexistent",)))


def test_fit_group_size():
    assert fit_group_size(576, 128) == 96
    assert fit_group_size(576, 64) == 64
    assert fit_group_size(1536, 128) == 128
    assert fit_group_size(24, 128) == 24
    assert fit_group_size(12, 128) is None


def test_unpinned_group_size_is_fitted_and_logged(caplog):
    model = nn.Sequential(nn.Linear(576, 32), nn.Linear(32, 8))
    with caplog.at_level(logging.INFO):
        specs = plan(model, qd.RTNConfig(bits=4, group_size=128))
    assert specs["0"].group_size == 96 and specs["1"].group_size == 32
    assert "using 96" in caplog.text


def test_pinned_group_size_that_does_not_fit_fails_clearly():
    model = nn.Sequential(nn.Linear(576, 32))
    with pytest.raises(ConfigError, match="group size 128 does not divide the 576 input features of 0; use a divisor"):
        plan(model, qd.RTNConfig(bits=4, group_size=128, pin_group_size=True))


def test_quantized_bundle_leaves_the_original_untouched(tiny_bundle):
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    q = qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32))
    after = tiny_bundle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(tiny_bundle.model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert q.quant_config["ignore"] == ["lm_head"]
