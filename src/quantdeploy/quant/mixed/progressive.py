"""The accuracy budget: the smallest model whose measured KLD (or perplexity increase) stays within a
tolerance, reached by moving layers down from the original weights (original -> int8 -> int4 -> lower),
the most robust first.

The path comes from the measured sensitivities: from every layer at its original weights (or its pin), each step moves
the one layer whose next option down its ladder (its options by falling stored bits) costs the least
predicted KLD per bit saved. Predictions add, models do not quite: so the path is checked on validation
windows the sensitivities were not measured on, the whole model quantized as the step says (round to
nearest, the grid every method starts from, or GPTQ's weights for a GPTQ plan: ``layers.py``) and its
KLD and perplexity measured against the original.
Assuming the measured loss grows along the path, a bisection finds the longest prefix within the
tolerance in a logarithmic number of checks; every check is reported (bits per weight against KLD), and
the chosen step is the smallest model whose measurement met it.

A step meets the tolerance when the one-sided 95% upper bound of its validation mean does (mean +
1.645 standard errors over the validation windows), not the mean alone: the tolerance is a promise
about text the user will run, and a mean on a few hundred tokens misses it half the time at the
boundary (on the bundled SmolLM2, 4 windows of 128 tokens chose a model at 0.0496 that measured 0.0526
on the test text, for --max-kld 0.05). Validation is cheap (a forward pass per check, about ten
checks), so it takes 32 windows by default where the sensitivities take 4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import nn

from quantdeploy.quant.mixed.layers import round_to_nearest
from quantdeploy.quant.mixed.sensitivity import KEEP, Sensitivity, _log_probs, _Reference


@dataclasses.dataclass
class Progress:
    choice: dict[str, str]
    average_bits: float
    measured_kld: float
    ppl_increase: float
    kld_bound: float  # the one-sided 95% upper bounds the tolerance was held to
    ppl_bound: float
    # every measured step: {"step", "average_bits", "predicted_kld", "kld", "kld_bound", "ppl_increase", "ppl_bound"}
    path: list[dict]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def moves(sens: Sensitivity) -> list[tuple[str, str]]:
    """The path: ``(layer, option)`` steps from all-original down to every layer at its smallest option,
    each the least predicted KLD per bit saved among the layers' next options down their ladders."""
    ladders = {n: sorted(sens.cost[n], key=lambda o: -sens.bits[n][o]) for n in sens.cost}
    at = {n: 0 for n in sens.cost}
    out = []
    while True:
        best, best_rate = None, math.inf
        for n, i in at.items():
            if i + 1 < len(ladders[n]):
                here, there = ladders[n][i], ladders[n][i + 1]
                saved = (sens.bits[n][here] - sens.bits[n][there]) * sens.numel[n]
                rate = max(sens.cost[n][there] - sens.cost[n][here], 0.0) / saved if saved > 0 else math.inf
                if rate < best_rate:
                    best, best_rate = n, rate
        if best is None:
            return out
        at[best] += 1
        out.append((best, ladders[best][at[best]]))


Z_ONE_SIDED_95 = 1.645


def upper_bound(values: torch.Tensor) -> float:
    """The one-sided 95% upper bound of the mean of ``values`` (one per validation window)."""
    if values.numel() < 2:
        return float(values.mean())
    return float(values.mean() + Z_ONE_SIDED_95 * values.std() / math.sqrt(values.numel()))


class Check(NamedTuple):
    kld: float
    kld_bound: float
    ppl_increase: float
    ppl_bound: float


class _Validator:
    """Measures a choice: the model's weights set to the choice's quantized weights (``quantize``, a
    ``layers.LayerQuantizer``), KLD and NLL on the validation windows against the original, weights put back."""

    def __init__(self, model: nn.Module, sens: Sensitivity, tokens: torch.Tensor, quantize) -> None:  # noqa: ANN001
        self.model, self.sens, self.tokens, self.quantize = model, sens, tokens, quantize
        self.reference = _Reference(model, tokens)
        self.nll = self._nll(_log_probs(model, tokens))
        self.fake: dict[tuple[str, str], torch.Tensor] = {}

    def _nll(self, logp: torch.Tensor) -> torch.Tensor:
        """Each window's mean next-token negative log-likelihood ``[windows]`` (fp64)."""
        target = self.tokens[:, 1:]
        return -logp[:, :-1].gather(-1, target[..., None])[..., 0].to(torch.float64).mean(-1)

    def _weight(self, name: str, option: str, original: torch.Tensor) -> torch.Tensor:
        if (name, option) not in self.fake:
            self.fake[(name, option)] = self.quantize(name, original, self.sens.specs[name][option])[1]
        return self.fake[(name, option)]

    @torch.no_grad()
    def __call__(self, choice: dict[str, str]) -> Check:
        originals = {}
        try:
            for name, option in choice.items():
                if option != KEEP:
                    module = self.model.get_submodule(name)
                    originals[name] = module.weight.data
                    module.weight.data = self._weight(name, option, module.weight.data)
            logp = _log_probs(self.model, self.tokens)
            kld, nll = self.reference.window_kld(logp), self._nll(logp) - self.nll  # per window; nll paired
            return Check(max(float(kld.mean()), 0.0), max(upper_bound(kld), 0.0), math.expm1(float(nll.mean())),
                         math.expm1(upper_bound(nll)))
        finally:
            for name, weight in originals.items():
                self.model.get_submodule(name).weight.data = weight


def progressive(model: nn.Module, sens: Sensitivity, validation: torch.Tensor, max_kld: float | None,
                max_ppl_increase: float | None, clip_search: bool = True, quantize=None) -> Progress:  # noqa: ANN001
    """The longest prefix of ``moves(sens)`` whose validation KLD is at most ``max_kld`` and perplexity
    increase at most ``max_ppl_increase`` (a fraction; either may be None), each by its upper bound;
    layers quantized by ``quantize`` (a ``layers.LayerQuantizer``; default round to nearest)."""
    steps = moves(sens)
    check = _Validator(model, sens, validation, quantize or round_to_nearest(clip_search))
    total = sum(sens.numel.values())
    path: list[dict] = []

    def choice_at(k: int) -> dict[str, str]:
        choice = {n: max(sens.cost[n], key=lambda o: sens.bits[n][o]) for n in sens.cost}  # KEEP unless pinned
        for name, option in steps[:k]:
            choice[name] = option
        return choice

    def fits(k: int) -> bool:
        choice = choice_at(k)
        c = check(choice)
        bits = sum(sens.bits[n][o] * sens.numel[n] for n, o in choice.items()) / total
        predicted = sum(sens.cost[n][o] for n, o in choice.items())
        path.append({"step": k, "average_bits": bits, "predicted_kld": predicted, **c._asdict()})
        return ((max_kld is None or c.kld_bound <= max_kld)
                and (max_ppl_increase is None or c.ppl_bound <= max_ppl_increase))

    lo, hi = 0, len(steps)  # step lo is known to fit (the original); find the last that does
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    best = next((p for p in path if p["step"] == lo), None)
    if best is None:  # step 0 was never measured: the original itself
        fits(0)
        best = path[-1]
    path.sort(key=lambda p: p["step"])
    return Progress(choice=choice_at(lo), average_bits=best["average_bits"], measured_kld=best["kld"],
                    ppl_increase=best["ppl_increase"], kld_bound=best["kld_bound"], ppl_bound=best["ppl_bound"],
                    path=path)
