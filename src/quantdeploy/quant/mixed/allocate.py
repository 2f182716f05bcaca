"""Choose one option per layer under a bit budget: the least predicted KLD at an average of at most
``budget`` stored bits per weight (scales and zero points counted), weighted by each layer's weights.

A multiple-choice knapsack. Solved by its Lagrangian: for a price ``lam`` on bits, each layer on its own
takes the option minimizing ``cost + lam * bits * numel / total``; the average bits fall as ``lam``
rises, so a bisection on ``lam`` finds the cheapest price whose choice fits. That choice is optimal for
the budget it spends (it lies on the lower convex hull of each layer's options); the budget it leaves
unspent is then filled greedily, upgrading the layer with the best KLD saved per bit added that still
fits. The prediction is the sum of the chosen per-layer costs (``sensitivity.py``); the pipeline
measures the real end-to-end KLD and reports both.
"""

from __future__ import annotations

import dataclasses

from quantdeploy.errors import ConfigError
from quantdeploy.quant.mixed.sensitivity import Sensitivity


@dataclasses.dataclass
class Allocation:
    choice: dict[str, str]  # layer -> option (a spec description or sensitivity.KEEP)
    average_bits: float
    predicted_kld: float
    budget: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def average_bits(sens: Sensitivity, choice: dict[str, str]) -> float:
    total = sum(sens.numel.values())
    return sum(sens.bits[n][o] * sens.numel[n] for n, o in choice.items()) / total


def _choose(sens: Sensitivity, lam: float) -> dict[str, str]:
    total = sum(sens.numel.values())
    return {n: min(opts, key=lambda o: (opts[o] + lam * sens.bits[n][o] * sens.numel[n] / total, sens.bits[n][o]))
            for n, opts in sens.cost.items()}


def allocate(sens: Sensitivity, budget: float) -> Allocation:
    """The least-KLD choice with average stored bits per weight at most ``budget``."""
    if not sens.cost:
        raise ConfigError("no layers to allocate bits to")
    cheapest = {n: min(sens.bits[n], key=sens.bits[n].get) for n in sens.cost}
    floor = average_bits(sens, cheapest)
    if floor > budget + 1e-9:
        raise ConfigError(f"a bit budget of {budget} is below the {floor:.3f} bits per weight of the smallest "
                          "candidate on every layer (pinned layers as pinned); raise --bits-budget, add a smaller "
                          "candidate or pin fewer layers")
    lo, hi = 0.0, 1.0
    while average_bits(sens, _choose(sens, hi)) > budget:
        hi *= 4
    for _ in range(60):  # the cheapest price whose choice fits
        mid = (lo + hi) / 2
        if average_bits(sens, _choose(sens, mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = _choose(sens, hi)
    total = sum(sens.numel.values())
    while True:  # spend what the price left: the upgrade saving the most KLD per bit that still fits
        room = (budget - average_bits(sens, choice)) * total
        best, best_rate = None, 0.0
        for n, o in choice.items():
            for other, c in sens.cost[n].items():
                extra = (sens.bits[n][other] - sens.bits[n][o]) * sens.numel[n]
                saved = sens.cost[n][o] - c
                if 0 < extra <= room and saved > 0 and saved / extra > best_rate:
                    best, best_rate = (n, other), saved / extra
        if best is None:
            break
        choice[best[0]] = best[1]
    predicted = sum(sens.cost[n][o] for n, o in choice.items())
    return Allocation(choice=choice, average_bits=average_bits(sens, choice), predicted_kld=predicted, budget=budget)
