"""Hardware detection, done here and nowhere else: which device to compute on, and what it has."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=None)
def default_device() -> torch.device:
    """CUDA device 0 when one is present, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=None)
def describe() -> dict:
    """What the machine offers, for logs and benchmark records."""
    info = {"device": str(default_device()), "triton": importlib.util.find_spec("triton") is not None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1))
    return info
