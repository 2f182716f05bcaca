"""The kernels facade: one entry point per operation, the backend chosen by name or automatically.

Only the reference backend exists so far; fast backends (Triton on GPU, PyTorch's packed CPU
kernels) plug in here, are imported lazily, and are tested against ``reference``. A backend asked for
by name that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import torch

from quantdeploy.errors import ConfigError
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import QuantizedWeight

BACKENDS = ("auto", "reference")


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend '{backend}'; available: {', '.join(BACKENDS)}")


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Quantized linear layer ``x @ W.T + bias``."""
    _check(backend)
    return reference.qlinear(x, qw, bias)


def qembedding(ids: torch.Tensor, qw: QuantizedWeight, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """Quantized embedding lookup."""
    _check(backend)
    return reference.qembedding(ids, qw, dtype)
