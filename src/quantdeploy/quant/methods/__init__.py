"""The method registry: a method is a frozen config class plus a handler, looked up by name.

Adding a method adds a file in this package that calls :func:`register`; nothing else branches on the
method's name. A handler gets the config, a module's name, its weight and the spec chosen for it, and
returns the :class:`~quantdeploy.quant.primitives.QuantizedWeight`. Calibrated methods (later) get a
runner instead; this registry stays the single place that maps names to code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.spec import QuantSpec

Handler = Callable[[Config, str, torch.Tensor, QuantSpec], QuantizedWeight]
# A calibrated method quantizes one decoder block at a time: (config, block's target Linears by name,
# their specs, the block runner) -> QuantizedWeight per name. See quant/sequential.py.
BlockHandler = Callable[..., dict[str, QuantizedWeight]]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[Config]
    handler: Handler
    summary: str
    block_handler: BlockHandler | None = None  # set for methods that need calibration data

    @property
    def calibrated(self) -> bool:
        return self.block_handler is not None


_METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[Config], summary: str) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        _METHODS[name] = Method(name, config_cls, handler, summary)
        return handler

    return wrap


def register_calibrated(name: str, config_cls: type[Config], summary: str, fallback: Handler) -> Callable[[BlockHandler], BlockHandler]:
    """Register a method that works block by block on calibration activations. ``fallback`` quantizes
    target layers outside the decoder blocks (an lm_head asked for), which see no block activations."""
    def wrap(block_handler: BlockHandler) -> BlockHandler:
        _METHODS[name] = Method(name, config_cls, fallback, summary, block_handler)
        return block_handler

    return wrap


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


def method_for_config(config: Config) -> Method:
    for method in _METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise ConfigError(f"{type(config).__name__} is not a quantization method config")


# Import the method modules so that they register themselves.
from quantdeploy.quant.methods import awq, fp8, gptq, halfquad, nf4, rtn, smoothquant  # noqa: E402,F401
