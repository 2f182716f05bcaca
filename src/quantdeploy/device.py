"""Hardware detection, done here and nowhere else: which device to compute on, and what it has.

``resolve_device`` is the one place a device name a user typed becomes a ``torch.device``: a name
PyTorch does not know, CUDA on a build without it, or a GPU index that is not there is a
:class:`~quantdeploy.errors.ConfigError` with the fix, raised before any model is loaded. A
``torch.device`` object of another type (``meta``, which tests use) is a program's choice and passes.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from quantdeploy.errors import ConfigError

SUPPORTED = ("cpu", "cuda")


@functools.lru_cache(maxsize=None)
def default_device() -> torch.device:
    """CUDA device 0 when one is present, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device ``name`` means (None: :func:`default_device`), checked against this machine."""
    if name is None:
        return default_device()
    if isinstance(name, torch.device):
        if name.type not in SUPPORTED:  # built by a program, not typed by a user: e.g. "meta" in tests
            return name
        device = name
    else:
        try:
            device = torch.device(str(name).strip())
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type not in SUPPORTED:
        raise ConfigError(f"device '{name}' is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {build} (torch {torch.__version__}); use --device cpu, or install "
                              "a CUDA build of PyTorch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", 0)
    return device


@functools.lru_cache(maxsize=None)
def describe() -> dict:
    """What the machine offers, for logs and benchmark records."""
    info = {"device": str(default_device()), "triton": importlib.util.find_spec("triton") is not None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1))
    return info
