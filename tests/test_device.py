"""Device names a user types: checked against this machine before any model loads (issue 12, item 7)."""

import pytest
import torch

from quantdeploy.device import default_device, resolve_device
from quantdeploy.errors import ConfigError


def test_known_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == default_device()


@pytest.mark.parametrize("name", ["tpu", "gpu", "", "cuda:x", "mps"])
def test_unknown_or_unsupported_devices_are_one_line_errors(name):
    with pytest.raises(ConfigError, match="device") as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a build or machine without CUDA")
def test_cuda_without_cuda_says_what_to_do():
    with pytest.raises(ConfigError, match="use --device cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to count them")
def test_a_gpu_index_past_the_last_is_refused():
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
