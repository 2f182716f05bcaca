"""How the mixed-precision search quantizes one layer to one candidate: as the method does where it can.

The search measures layers one at a time (``sensitivity.py``) and checks whole choices on validation
windows (``progressive.py``); both need, for a layer and a spec, the weight the method would write.
A data-free method's own handler gives exactly that (``method_handler``). For a calibrated method,
round to nearest is only the grid it starts from, and the method lands far below it: on the bundled
SmolLM2 a plan measured with RTN predicted 0.2152 where AWQ+GPTQ's model measured 0.1440
(``benchmarks/results/mixed-precision-awq-gptq-smollm2-cpu.txt``). An accuracy budget checked on RTN
weights then stops at a larger model than the method needed, and a bit budget spends its bits where
RTN, not the method, loses most. AWQ's scaling spans layers, but it is a rewrite of the float model:
the search runs on a copy with AWQ's scales folded in (``quant/mixed/__init__.layer_quantizer``), each
layer quantized by AWQ's quantizer (``OneShotGPTQ`` below for awq+gptq): the same plan then predicted
0.0980 where the model measured 0.1108, and landed at 0.0887 on the test text against 0.1094. Round to
nearest stays the search's quantizer for SmoothQuant.

``OneShotGPTQ`` gives the search GPTQ's own weights: each target Linear's Hessian ``X^T X`` is
collected once, from the unquantized model on the method's calibration windows, and each (layer, spec)
is solved with it when first asked for (then kept, as the search revisits it). The method itself is
true-sequential (each block's Hessians are collected with the earlier blocks quantized), so the saved
weights differ a little from the searched ones; the pipeline measures the saved model on the same
validation windows and records both. Memory: one ``in x in`` fp32 Hessian per input (q/k/v and
gate/up share one): 1.3 MB for most of SmolLM2's, 0.8 GB for each down projection of an 8B model; and
the solved weights, one copy of the model per candidate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight, quantize_weight
from quantdeploy.quant.sequential import capture_hooks
from quantdeploy.quant.spec import QuantSpec

#: ``(layer name, original weight, spec) -> (QuantizedWeight, weight in the original's dtype)``
LayerQuantizer = Callable[[str, torch.Tensor, QuantSpec], tuple[QuantizedWeight, torch.Tensor]]


def round_to_nearest(clip_search: bool) -> LayerQuantizer:
    """RTN on ``spec``'s grid, with the clip search on integer grids when the method searches clips."""
    def quantize(name: str, original: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedWeight, torch.Tensor]:
        qw = quantize_weight(original, spec, clip_search and spec.dtype.startswith("int"))
        return qw, dequantize_weight(qw, original.dtype)

    quantize.description = "round to nearest"  # type: ignore[attr-defined]
    return quantize


def method_handler(config) -> LayerQuantizer:  # noqa: ANN001 - a data-free method's config
    """The weight a data-free method (RTN, halfquad, NF4 ...) writes for a layer at ``spec``: its own
    handler, so the searched weights are the saved ones."""
    from quantdeploy.quant.methods import method_for_config

    method = method_for_config(config)

    def quantize(name: str, original: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedWeight, torch.Tensor]:
        qw = method.handler(config, name, original, spec)
        return qw, dequantize_weight(qw, original.dtype)

    quantize.description = f"{method.name}, as the method writes them"  # type: ignore[attr-defined]
    return quantize


class OneShotGPTQ:
    """GPTQ per layer with Hessians from the unquantized model (see the module docstring); a
    ``LayerQuantizer``. ``config`` is the method's ``GPTQConfig`` (act order, damping, clip search)."""

    description = "GPTQ, one-shot (Hessians of the unquantized model)"

    def __init__(self, model: nn.Module, tokens: torch.Tensor, names: list[str], config, batch_size: int = 4) -> None:  # noqa: ANN001
        from quantdeploy.quant.gptq_solver import hessian_update

        self.config = config
        linears = {n: model.get_submodule(n) for n in names}
        self._raw: dict[str, torch.Tensor] = {}
        self._alias: dict[str, str] = {}  # a layer reading the same input as an earlier one -> that layer
        self._prepared: dict[str, object] = {}
        self._solved: dict[tuple[str, QuantSpec], tuple[QuantizedWeight, torch.Tensor]] = {}
        counts: dict[str, int] = {}
        last: list = [None, None]  # the input the previous hook saw (held, so it is never a reused id) and its layer

        def accumulate(name: str, x: torch.Tensor) -> None:
            if x is last[0]:  # q/k/v, gate/up: one input read by consecutive layers
                self._alias[name] = self._alias.get(last[1], last[1])
                return
            last[:] = [x, name]
            if name not in self._raw:
                self._raw[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                counts[name] = 0
            self._raw[name], counts[name] = hessian_update(self._raw[name], x, counts[name])

        device = next(model.parameters()).device
        with torch.no_grad(), capture_hooks(linears, accumulate):
            for batch in tokens.split(batch_size):
                model(input_ids=batch.to(device))
                last[:] = [None, None]
        missing = [n for n in names if n not in self._raw and n not in self._alias]
        if missing:
            raise RuntimeError(f"no calibration input reached {missing[0]} (of {len(missing)} layers)")

    def _hessian(self, name: str):  # noqa: ANN202 - a PreparedHessian
        from quantdeploy.quant.gptq_solver import prepare_hessian

        leader = self._alias.get(name, name)
        if leader not in self._prepared:
            self._prepared[leader] = prepare_hessian(self._raw.pop(leader), self.config.act_order,
                                                     self.config.damp_percent)
        return self._prepared[leader]

    def __call__(self, name: str, original: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedWeight, torch.Tensor]:
        from quantdeploy.quant.methods.gptq import solve

        if (name, spec) not in self._solved:
            if not spec.dtype.startswith("int"):  # GPTQ writes integer grids; others are rounded to nearest
                self._solved[(name, spec)] = round_to_nearest(self.config.clip_search)(name, original, spec)
            else:
                qw = solve(self.config, [original], self._hessian(name), spec)[0]
                self._solved[(name, spec)] = qw, dequantize_weight(qw, original.dtype)
        return self._solved[(name, spec)]
