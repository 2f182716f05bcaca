"""The kernels facade: one entry point per operation, the backend chosen by name or automatically.

Backends: ``reference`` (torch only, every device, the oracle), ``cpu_native`` (our int4/int8
weight-only CPU kernels, built once per machine, ``cpu_native.py``), ``cpu_packed`` (PyTorch's packed
int8/int4 weight-only CPU kernels, ``cpu_packed.py``, and int8 W8A8 with the weight transposed once,
``cpu_w8a8.py``), ``triton`` (on CUDA: int4/int8/NF4/FP8
weight-only, dequantized in registers, ``triton_wonly.py``; FP8 W8A8 on the FP8 tensor cores,
``fp8_w8a8.py``; imported only when a CUDA weight asks for it) and ``dense`` (a weight-only layer
dequantized once into the compute dtype, ``dense.py``). ``prepare`` readies a weight once for a backend
on the weight's device; the result is called like ``prepared(x, bias)``. ``auto`` picks the fast kernel
where the weight's device and spec allow (on CPU ours, or PyTorch's where ours cannot be built: warned),
``dense`` for the other weight-only specs and FP8 W8A8 (a quantized layer never runs slower than the
unquantized one) and the reference path for int8 W8A8 specs
without a kernel (logged at debug level); a backend asked for by name that cannot serve the weight is an
error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Protocol

import torch

from quantdeploy.errors import ConfigError
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import QuantizedWeight

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu_native", "cpu_packed", "triton", "dense")


class PreparedWeight(Protocol):
    backend: str

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend '{backend}'; available: {', '.join(BACKENDS)}")


def prepare(qw: QuantizedWeight, backend: str = "auto", dtype: torch.dtype = torch.float32) -> PreparedWeight | None:
    """A repacked weight for ``backend`` on the weight's device, or None for the reference path;
    ``dtype`` is the compute dtype (the one a ``dense`` weight is held in)."""
    _check(backend)
    if backend == "reference":
        return None
    from quantdeploy.kernels import cpu_native, cpu_packed, cpu_w8a8, dense

    device = qw.tensors["qweight"].device
    if backend == "cpu_native" and device.type == "cpu" and cpu_native.supports(qw) and cpu_native.unavailable():
        raise ConfigError(f"the cpu_native backend cannot run here: {cpu_native.unavailable()} (use auto or cpu_packed)")
    if backend in ("auto", "cpu_native") and device.type == "cpu" and cpu_native.supports(qw) and cpu_native.available():
        return cpu_native.pack(qw)
    if backend in ("auto", "cpu_packed") and device.type == "cpu" and cpu_packed.supports(qw):
        return cpu_packed.pack(qw)
    if backend in ("auto", "cpu_packed") and device.type == "cpu" and cpu_w8a8.supports(qw):
        return cpu_w8a8.CPUW8A8(qw)
    if backend in ("auto", "triton") and device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from quantdeploy.kernels import fp8_w8a8, triton_wonly

        if triton_wonly.supports(qw):
            return triton_wonly.TritonWeightOnly(qw)
        if fp8_w8a8.supports(qw):
            return fp8_w8a8.FP8W8A8(qw)
    if backend in ("auto", "dense") and dense.supports(qw):
        return dense.DenseWeight(qw, dtype)
    if backend == "cpu_native":
        raise ConfigError(f"the cpu_native backend cannot run {qw.spec.describe()} on {device} (it takes int4 and "
                          "symmetric int8 weight-only layers with groups of a multiple of 32, on CPU)")
    if backend == "cpu_packed":
        raise ConfigError(f"the cpu_packed backend cannot run {qw.spec.describe()} on {device} "
                          "(it takes int8 per-channel or int4 g32-g256 weight-only, and int8 W8A8 per channel, on CPU)")
    if backend == "triton":
        raise ConfigError(f"the triton backend cannot run {qw.spec.describe()} on {device} (it takes int4/int8/NF4/"
                          "FP8 weight-only layers, and FP8 W8A8 per channel on FP8 tensor cores, on a CUDA device "
                          "with the triton package installed)")
    if backend == "dense":
        raise ConfigError(f"the dense backend cannot run {qw.spec.describe()}: it holds weight-only and FP8 W8A8 "
                          "layers dequantized; int8 W8A8 layers multiply integers (use auto, cpu_packed or reference)")
    log.debug("kernels: reference path for %s %s", qw.spec.describe(), tuple(qw.shape))
    return None


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Quantized linear layer ``x @ W.T + bias`` (repacks on every call for a named fast backend:
    prepare once with ``prepare`` instead)."""
    _check(backend)
    prepared: Callable | None = None if backend in ("auto", "reference") else prepare(qw, backend)
    if prepared is not None:
        return prepared(x, bias)
    return reference.qlinear(x, qw, bias)


def qembedding(ids: torch.Tensor, qw: QuantizedWeight, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """Quantized embedding lookup (reference path)."""
    _check(backend)
    return reference.qembedding(ids, qw, dtype)
