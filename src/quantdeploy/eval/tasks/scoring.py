"""Accuracy with its standard error, and the paired comparison of two models on the same items.

A task's score is a mean of per-item outcomes (1 correct, 0 not; pass@k estimates for HumanEval), so
its standard error is the sample standard deviation over ``sqrt(n)`` (for 0/1 outcomes that is the
binomial ``sqrt(p (1 - p) / (n - 1))``, as lm-evaluation-harness reports). Two models on the same items
are compared item by item, not by their two means: the difference of means has the standard error of
the per-item differences (which is much smaller than either accuracy's when the models mostly agree),
the flips are listed (which items one got right and the other wrong), and McNemar's exact test gives
the probability of at least that imbalance of flips if neither model were better.
"""

from __future__ import annotations

import math
from typing import Sequence


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(model: Sequence[float], baseline: Sequence[float]) -> dict[str, float | int | list[int]]:
    """The comparison of per-item outcomes ``model`` and ``baseline`` (same items, same order)."""
    if len(model) != len(baseline):
        raise ValueError(f"paired outcomes differ in length: {len(model)} vs {len(baseline)}")
    diffs = [m - b for m, b in zip(model, baseline)]
    diff, diff_se = mean_and_stderr(diffs)
    gained = [i for i, (m, b) in enumerate(zip(model, baseline)) if m > b]
    lost = [i for i, (m, b) in enumerate(zip(model, baseline)) if m < b]
    n = len(model)
    return {"diff": diff, "diff_stderr": diff_se, "flips": len(gained) + len(lost),
            "flip_rate": (len(gained) + len(lost)) / n if n else float("nan"),
            "gained": gained, "lost": lost, "mcnemar_p": mcnemar_p(len(gained), len(lost))}
