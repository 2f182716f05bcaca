import pytest

import quantdeploy as qd
from quantdeploy.config import config_from_dict
from quantdeploy.errors import ConfigError


@pytest.mark.parametrize("config", [
    qd.RTNConfig(bits=3, group_size=64, symmetric=False, targets=qd.TargetConfig(exclude=("down_proj",))),
    qd.NF4Config(group_size=32, double_quant=False),
    qd.FP8Config(),
    qd.QuantSpec(dtype="nf4", group_size=64, double_quant=True),
])
def test_roundtrip_through_dict(config):
    data = config.to_dict()
    assert data["type"] == config.TYPE and data["version"] == config.VERSION
    assert type(config).from_dict(data) == config
    assert config_from_dict(data) == config


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'bitz'"):
        qd.RTNConfig.from_dict({"bitz": 4})
    with pytest.raises(ConfigError, match="unknown key 'regex'"):
        qd.RTNConfig.from_dict({"targets": {"regex": "x"}})


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="2, 3, 4 or 8 bits"):
        qd.RTNConfig(bits=5)
    with pytest.raises(ConfigError, match="multiple of 8"):
        qd.RTNConfig(group_size=20)
    with pytest.raises(ConfigError, match="must be an integer"):
        qd.RTNConfig.from_dict({"bits": "four"})
    with pytest.raises(ConfigError, match="newer than this quantdeploy"):
        qd.RTNConfig.from_dict({"version": 99})
    with pytest.raises(ConfigError, match="expected a 'rtn' config"):
        qd.RTNConfig.from_dict({"type": "nf4"})
    with pytest.raises(ConfigError, match="symmetric by construction"):
        qd.QuantSpec(dtype="nf4", symmetric=False)


def test_group_size_defaults_per_width():
    """Issue 12, item 9: --bits 8 gave grouped int8 (g96 on SmolLM2) instead of per channel."""
    from quantdeploy.quant.methods.gptq import GPTQConfig

    assert qd.RTNConfig(bits=8).group_size is None and GPTQConfig(bits=8).group_size is None
    assert qd.RTNConfig(bits=4).group_size == 128 and qd.RTNConfig(bits=3).group_size == 128
    assert qd.RTNConfig.from_dict({"bits": 8}).to_dict()["group_size"] is None  # stored resolved
    assert qd.RTNConfig(bits=8, group_size=64).group_size == 64
    with pytest.raises(ConfigError, match="group_size"):
        qd.RTNConfig(bits=4, group_size="big")


def test_a_version_1_grid_config_reads_without_the_clip_search():
    from quantdeploy.quant.methods.gptq import GPTQConfig

    assert qd.RTNConfig().clip_search and qd.RTNConfig.from_dict({"bits": 4}).clip_search  # format 2: on below 8 bits
    assert qd.RTNConfig(bits=8).clip_search is False and qd.RTNConfig(bits=8, clip_search=True).clip_search
    assert qd.RTNConfig.from_dict({"bits": 8}).to_dict()["clip_search"] is False  # stored resolved
    with pytest.raises(ConfigError, match="clip_search must be true, false or 'auto'"):
        qd.RTNConfig(clip_search="yes")
    assert qd.RTNConfig.from_dict({"version": 1, "bits": 4}).clip_search is False
    assert GPTQConfig.from_dict({"type": "gptq", "version": 1}).clip_search is False
    awq = config_from_dict({"type": "awq", "version": 1, "quantizer": {"type": "rtn", "version": 1, "bits": 4}})
    assert awq.quantizer.clip_search is False
    assert qd.RTNConfig.from_dict({"version": 1, "clip_search": True}).clip_search  # written by hand: kept
