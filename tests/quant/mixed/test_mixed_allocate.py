"""The bit-budget allocation against brute force on small random problems, and its one-line errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.errors import ConfigError
from quantdeploy.quant.mixed.allocate import allocate
from quantdeploy.quant.mixed.sensitivity import KEEP, Sensitivity

OPTIONS = {KEEP: 16.0, "int8": 8.25, "int4-g32": 4.5, "int4-g128": 4.125, "int3-g64": 3.25}


def _problem(costs: list[list[float]], sizes: list[int]) -> Sensitivity:
    names = [f"layer{i}" for i in range(len(costs))]
    cost, bits = {}, {}
    for name, row in zip(names, costs):
        # costs fall as bits rise, as measured ones do (the solver must not rely on it)
        ordered = sorted(row, reverse=True)
        cost[name] = {KEEP: 0.0, **{o: c for o, c in zip(("int3-g64", "int4-g128", "int4-g32", "int8"), ordered)}}
        bits[name] = dict(OPTIONS)
    return Sensitivity(cost=cost, bits=bits, numel=dict(zip(names, sizes)), specs={})


def _brute_force(sens: Sensitivity, budget: float) -> float:
    total = sum(sens.numel.values())
    best = float("inf")
    names = list(sens.cost)
    for choice in itertools.product(*(list(sens.cost[n]) for n in names)):
        average = sum(sens.bits[n][o] * sens.numel[n] for n, o in zip(names, choice)) / total
        if average <= budget + 1e-12:
            best = min(best, sum(sens.cost[n][o] for n, o in zip(names, choice)))
    return best


@settings(max_examples=40, deadline=None)
@given(costs=st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=4),
       sizes=st.lists(st.integers(1, 8), min_size=4, max_size=4), budget=st.floats(3.25, 16.0))
def test_the_allocation_fits_the_budget_and_is_near_the_exact_optimum(costs, sizes, budget):
    sens = _problem(costs, sizes[: len(costs)])
    alloc = allocate(sens, budget)
    assert alloc.average_bits <= budget + 1e-9
    assert alloc.predicted_kld == pytest.approx(sum(sens.cost[n][o] for n, o in alloc.choice.items()))
    exact = _brute_force(sens, budget)
    # Lagrangian + greedy fill is exact on the convex hull; off it, within the best single upgrade left out
    assert alloc.predicted_kld <= exact + max(max(row) for row in costs) + 1e-9


def test_a_budget_that_holds_everything_keeps_every_layer_and_a_tight_one_takes_the_smallest():
    sens = _problem([[0.4, 0.3, 0.2, 0.1], [0.8, 0.5, 0.2, 0.05]], [1, 1])
    assert set(allocate(sens, 16.0).choice.values()) == {KEEP}
    assert set(allocate(sens, 3.25).choice.values()) == {"int3-g64"}


def test_the_sensitive_layer_gets_the_bits():
    sens = _problem([[0.01, 0.005, 0.002, 0.001], [2.0, 1.0, 0.5, 0.01]], [1, 1])
    alloc = allocate(sens, (3.25 + 8.25) / 2)
    assert alloc.choice == {"layer0": "int3-g64", "layer1": "int8"}


def test_a_budget_below_every_candidate_is_one_clear_error():
    sens = _problem([[0.4, 0.3, 0.2, 0.1]], [1])
    with pytest.raises(ConfigError, match="below the 3.250 bits per weight"):
        allocate(sens, 3.0)
