"""Plots of a mixed-precision plan: what each layer costs at each spec, and where the plan sits among
the other ways of spending the same bits.

A mixed checkpoint's manifest keeps the record its planner wrote (``quant/mixed``): every target layer's
measured cost (mean KLD with that layer alone quantized) at every candidate, the bits each candidate
stores, and the outcome (the allocation and its end-to-end KLD, or the accuracy budget's path). From that
record alone, with no model and no data:

- ``sensitivity.png``: the cost heatmap, layers (rows, in model order) by candidate (columns), log colour,
  the chosen option of each layer marked;
- ``bits_vs_kld.png``: predicted KLD (the sum of per-layer costs, the planner's own prediction) against
  average stored bits for the allocations at a sweep of budgets (the front the solver can reach), every
  uniform candidate, the "first and last blocks at the widest candidate, the rest at the narrowest
  4-bit one" heuristic, and the plan itself, predicted and measured (the accuracy budget's steps as
  measured on its validation windows).

Predicted points are sums of independent measurements, so they miss the interaction of layers; the
measured points show by how much (``quantdeploy eval`` measures any of them on held-out text).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quantdeploy.quant.mixed.allocate import average_bits, allocate
from quantdeploy.quant.mixed.sensitivity import KEEP, Sensitivity


def sensitivity_of(record: dict[str, Any]) -> Sensitivity:
    """The ``Sensitivity`` a planner record holds (costs, bits and sizes; specs left as descriptions)."""
    s = record["sensitivity"]
    return Sensitivity(cost=s["cost"], bits=s["bits"], numel=s["numel"], specs={})


def chosen(record: dict[str, Any]) -> dict[str, str]:
    """Layer -> option the plan took (the allocation's, or the accuracy budget's chosen step)."""
    if "allocation" in record:
        return dict(record["allocation"]["choice"])
    return dict(record["progressive"]["choice"])


def _point(sens: Sensitivity, choice: dict[str, str]) -> tuple[float, float]:
    return average_bits(sens, choice), sum(sens.cost[n][o] for n, o in choice.items())


def slots(sens: Sensitivity) -> list[tuple[str, dict[str, str]]]:
    """The candidates as columns: ``(label, layer -> option)``, fewest stored bits first. A layer's options
    are the planner's candidates in order (after ``KEEP``); one candidate may read differently by layer (a
    group of 128 is 96 on a 576-wide layer), so a column is the candidate's position, labelled by the
    descriptions it takes. A pinned layer (one option) keeps its pin in every column."""
    own = {n: [o for o in opts if o != KEEP] for n, opts in sens.cost.items()}
    width = max(len(o) for o in own.values())
    columns = []
    for i in range(width):
        choice = {n: own[n][i] if len(own[n]) == width else min(sens.cost[n], key=sens.bits[n].get) for n in own}
        label = "/".join(sorted({choice[n] for n in own if len(own[n]) == width}))
        columns.append((label, choice))
    return sorted(columns, key=lambda c: average_bits(sens, c[1]))


def uniform_points(sens: Sensitivity) -> dict[str, tuple[float, float]]:
    """Each candidate on every layer: ``(average bits, predicted KLD)``, by column label."""
    return {label: _point(sens, choice) for label, choice in slots(sens)}


def _block(name: str) -> int | None:
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def heuristic_point(sens: Sensitivity) -> tuple[str, tuple[float, float]] | None:
    """"First and last decoder blocks at the most bits, the rest at the fewest-bit 4-bit candidate" (the
    rule of thumb mixed precision is measured against); None without blocks or a 4-bit candidate."""
    columns = slots(sens)
    fours = [(label, choice) for label, choice in columns if label.startswith(("int4", "nf4"))]
    blocks = [b for b in map(_block, sens.cost) if b is not None]
    if not fours or not blocks or len(columns) < 2:
        return None
    wide, narrow = columns[-1], fours[0]  # columns are sorted by bits
    ends = {min(blocks), max(blocks)}
    choice = {n: (wide if _block(n) in ends else narrow)[1][n] for n in sens.cost}
    return f"blocks {min(blocks)} and {max(blocks)} {wide[0]}, rest {narrow[0]}", _point(sens, choice)


def front(sens: Sensitivity, steps: int = 24) -> list[tuple[float, float]]:
    """The solver's allocations at ``steps`` budgets from the smallest stored bits to the widest
    candidate's: ``(average bits, predicted KLD)``, bits rising, predicted KLD falling."""
    low = average_bits(sens, {n: min(sens.bits[n], key=sens.bits[n].get) for n in sens.cost})
    high = average_bits(sens, {n: max((o for o in sens.bits[n] if o != KEEP), key=sens.bits[n].get,
                                       default=KEEP) for n in sens.cost})
    points = []
    for i in range(steps):
        a = allocate(sens, low + (high - low) * i / (steps - 1))
        points.append((a.average_bits, a.predicted_kld))
    return points


def write_mixed_plots(record: dict[str, Any], folder: Path) -> list[Path]:
    """``sensitivity.png`` and ``bits_vs_kld.png`` of a planner record in ``folder`` (created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    folder.mkdir(parents=True, exist_ok=True)
    sens, choice = sensitivity_of(record), chosen(record)
    layers = list(sens.cost)
    columns = slots(sens)
    grid = [[sens.cost[n][choice_i[n]] for _, choice_i in columns] for n in layers]
    positive = [c for row in grid for c in row if c > 0]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(columns), max(4.0, 0.045 * len(layers) + 1.5)))
    image = ax.imshow([[max(c, min(positive)) for c in row] for row in grid], aspect="auto",
                      cmap="viridis", norm=LogNorm(vmin=min(positive), vmax=max(positive)), interpolation="nearest")
    picks = [(next(j for j, (_, c) in enumerate(columns) if c[n] == choice[n]), i)
             for i, n in enumerate(layers) if any(c[n] == choice[n] for _, c in columns)]  # not kept whole
    if picks:
        ax.scatter(*zip(*picks), s=6, c="red", marker="s", label="chosen")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xticks(range(len(columns)), [f"{label.replace('/', chr(10))}\n{average_bits(sens, c):.2f} bits"
                                        for label, c in columns], fontsize=7)
    ticks = [i for i, n in enumerate(layers) if i == 0 or _block(n) != _block(layers[i - 1])]
    ax.set_yticks(ticks, [f"block {_block(layers[i])}" if _block(layers[i]) is not None else layers[i] for i in ticks],
                  fontsize=6)
    ax.set_title("cost of quantizing one layer alone (mean KLD)", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean KLD")
    fig.tight_layout()
    heatmap = folder / "sensitivity.png"
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bits, kld = zip(*front(sens))
    ax.plot(bits, kld, "-", color="gray", label="allocations at other budgets (predicted)")
    for name, (b, k) in uniform_points(sens).items():
        ax.scatter(b, k, marker="o")
        ax.annotate(f"uniform {name}", (b, k), textcoords="offset points", xytext=(4, 4), fontsize=7)
    heuristic = heuristic_point(sens)
    if heuristic:
        ax.scatter(*heuristic[1], marker="^", color="purple", label=heuristic[0] + " (predicted)")
    b, k = _point(sens, choice)
    ax.scatter(b, k, marker="*", s=120, color="red", label="this plan (predicted)")
    if "measured_kld" in record:
        ax.scatter(b, record["measured_kld"], marker="*", s=120, facecolors="none", edgecolors="red",
                   label="this plan (measured, sensitivity windows)")
    if "progressive" in record:
        steps = record["progressive"]["path"]
        ax.plot([p["average_bits"] for p in steps], [p["kld"] for p in steps], "x--", color="orange",
                label="accuracy budget steps (measured, validation windows)")
    ax.set_yscale("log")
    ax.set_xlabel("average stored bits per weight (scales and zeros counted)")
    ax.set_ylabel("mean KL divergence to the original")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    pareto = folder / "bits_vs_kld.png"
    fig.savefig(pareto, dpi=120)
    plt.close(fig)
    return [heatmap, pareto]
