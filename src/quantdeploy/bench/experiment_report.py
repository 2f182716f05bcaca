"""``quantdeploy report RUN_DIR``: the experiment's trade-offs in one Markdown file and one HTML page.

Reads every complete cell of a run (``bench/experiment.py``) and writes ``RUN_DIR/report/``:
``report.md`` with its PNG plots beside it, and ``report.html``, self-contained (plots embedded as data
URIs, no scripts, no external files), so it can be mailed or attached to a ticket. Plots (matplotlib):

- task accuracy (or, without tasks, top-1 agreement) against bits per weight, Pareto front marked;
- mean KL divergence against decode tok/s, Pareto front marked (needs the grid's ``bench``);
- decode speed and weight memory of each cell against the original;
- per-layer error (relative error of each decoder layer's output) as a heatmap, cells × layers;
- attention similarity to the original per layer and head, one heatmap per cell;
- mean KLD by token frequency, by position in the window and by document, one line per cell.

Tables: every cell's numbers; ablations (each grid axis's values, averaged over the other axes); the
error analysis: KLD by bucket (``eval/buckets.py``) and the task items each cell got wrong that the
original got right.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from quantdeploy.errors import ConfigError


def load_run(run: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = Path(run)
    original = run / "cells" / "original" / "result.json"
    if not original.is_file():
        raise ConfigError(f"{run} holds no finished experiment cell; run 'quantdeploy experiment GRID -o {run}' first")
    cells = [json.loads(p.read_text()) for p in sorted((run / "cells").glob("*/result.json")) if p.parent.name != "original"]
    order = [c["id"] for c in json.loads((run / "grid.json").read_text())["cells"]] if (run / "grid.json").is_file() else []
    cells.sort(key=lambda c: order.index(c["cell"]["id"]) if c["cell"]["id"] in order else len(order))
    return json.loads(original.read_text()), cells


def pareto(points: list[tuple[float, float]], lower_x: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (x lower is better when ``lower_x``,
    else higher; y higher is better), in x order."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0] if lower_x else -points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _first_batch(result: dict[str, Any]) -> float | None:
    speed = result.get("speed")
    if not speed:
        return None
    return next(iter(speed["decode"].values()))["tok_s"]


def _task_scores(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{t['raw']['task']} {row['metric']}": row for t in (result.get("tasks") or {}).values() for row in t["rows"]}


def figures(original: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: dict[str, bytes] = {}
    labels = [c["cell"]["label"] for c in cells]

    def save(name: str, fig) -> None:  # noqa: ANN001
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    bits = [c["size"]["bits_per_weight"] for c in cells]
    metric = next(iter(_task_scores(original)), None)
    ys = [(_task_scores(c).get(metric) or {}).get("score") if metric else c["fidelity"].get("top1_agreement") for c in cells]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _scatter(ax, [(b, y) for b, y in zip(bits, ys)], labels, lower_x=True)
    ax.set_xlabel("bits per weight (scales and zeros counted)")
    ax.set_ylabel(metric or "top-1 agreement with the original")
    if metric:
        ax.axhline(_task_scores(original)[metric]["score"], color="gray", ls="--", label="original")
        ax.legend(loc="lower right")
    ax.set_title("accuracy against bits per weight (Pareto front in red)")
    save("accuracy_vs_bits", fig)

    speeds = [_first_batch(c) for c in cells]
    if all(s is not None for s in speeds):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _scatter(ax, [(s, c["fidelity"]["kld_mean"]) for s, c in zip(speeds, cells)], labels, lower_x=False,
                 higher_y=False)
        ax.invert_yaxis()
        ax.set_xlabel("decode tok/s (first batch size of the grid)")
        ax.set_ylabel("mean KL divergence to the original (lower is up)")
        ax.axvline(_first_batch(original), color="gray", ls="--", label="original")
        ax.legend(loc="lower right")
        ax.set_title("KL divergence against decode speed (Pareto front in red)")
        save("kld_vs_speed", fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(cells) + 2))
        names = ["original"] + labels
        axes[0].barh(names, [_first_batch(original)] + speeds, color=["gray"] + ["C0"] * len(cells))
        axes[0].set_xlabel("decode tok/s")
        axes[1].barh(names, [r["size"]["weight_bytes"] / 1e6 for r in [original] + cells],
                     color=["gray"] + ["C1"] * len(cells))
        axes[1].set_xlabel("weights, MB")
        for a in axes:
            a.invert_yaxis()
        axes[1].set_yticklabels([])
        fig.suptitle("speed and memory against the original")
        save("speed_memory", fig)

    errors = [c.get("layer_error") for c in cells]
    if errors and all(errors):
        import numpy as np

        grid = np.log10(np.array(errors) + 1e-12)
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(cells) + 1.8))
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(cells)), labels)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("decoder layer")
        fig.colorbar(im, ax=ax, label="log10 relative error of the layer's output")
        ax.set_title("per-layer error against the original")
        save("layer_error", fig)

    for i, c in enumerate(cells):
        sim = c.get("attention_similarity")
        if not sim:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=min(min(r) for r in sim), vmax=1.0)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="1 - total variation")
        ax.set_title(f"attention similarity: {labels[i]}", fontsize=9)
        save(f"attention_{c['cell']['id']}", fig)

    buckets = [c.get("kld_buckets") for c in cells]
    if buckets and all(buckets):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for label, b in zip(labels, buckets):
            for ax, cut in zip(axes, ("frequency", "position")):
                rows = [r for r in b[cut] if r["tokens"]]
                ax.plot([r["bucket"] for r in rows], [r["kld_mean"] for r in rows], marker="o", label=label)
            if b["documents"]:
                axes[2].plot([r["document"] for r in b["documents"]], [r["kld_mean"] for r in b["documents"]],
                             marker=".", lw=0.8, label=label)
        for ax, title in zip(axes, ("by the predicted token's count in the text", "by position in the window",
                                    "by document")):
            ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("mean KL divergence")
        axes[2].set_xlabel("document")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize=7)
        fig.suptitle("where the KL divergence is")
        save("kld_buckets", fig)
    return out


def _scatter(ax, points: list[tuple[Any, Any]], labels: list[str], lower_x: bool, higher_y: bool = True) -> None:  # noqa: ANN001
    valid = [i for i, (x, y) in enumerate(points) if x is not None and y is not None]
    ax.scatter([points[i][0] for i in valid], [points[i][1] for i in valid], color="C0")
    for i in valid:
        ax.annotate(labels[i], points[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    sign = 1 if higher_y else -1
    front = [valid[j] for j in pareto([(points[i][0], sign * points[i][1]) for i in valid], lower_x)]
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="red", marker="o", lw=1)


def tables(original: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, list[list[str]]]:
    metrics = list(_task_scores(original))
    head = ["cell", "bits/weight", "weights MB", "quantize s", "PPL", "mean KLD", "top-1"] + metrics + ["decode tok/s"]
    rows = [head]
    for r in [original] + cells:
        f = r["fidelity"]
        scores = _task_scores(r)
        cells_m = []
        for m in metrics:
            s = scores.get(m)
            cells_m.append("-" if s is None else f"{s['score']:.3f} ± {s['stderr']:.3f}"
                           + (f" ({s['diff']:+.3f}, {s['flips']} flips)" if "diff" in s else ""))
        speed = _first_batch(r)
        rows.append([r["cell"]["label"], f"{r['size']['bits_per_weight']:.2f}", f"{r['size']['weight_bytes'] / 1e6:.1f}",
                     f"{r['quantize_seconds']:.1f}", f"{f['ppl']:.3f}", f"{f.get('kld_mean', 0.0):.4f}",
                     f"{f.get('top1_agreement', 1.0):.3f}", *cells_m, "-" if speed is None else f"{speed:.1f}"])
    ablation = [["axis", "value", "cells", "mean KLD", "mean top-1"]]
    axes = sorted({k for c in cells for k in c["cell"]["axes"]})
    for axis in axes:  # over the cells the axis applied to (NF4 has no bits, FP8 no group size)
        having = [c for c in cells if axis in c["cell"]["axes"]]
        values = sorted({json.dumps(c["cell"]["axes"][axis]) for c in having})
        if len(values) < 2:
            continue
        for v in values:
            group = [c for c in having if json.dumps(c["cell"]["axes"][axis]) == v]
            ablation.append([axis, v, str(len(group)), f"{sum(c['fidelity']['kld_mean'] for c in group) / len(group):.4f}",
                             f"{sum(c['fidelity']['top1_agreement'] for c in group) / len(group):.3f}"])
    by_bucket = []
    for c in cells:
        b = c.get("kld_buckets")
        if not b:
            continue
        if not by_bucket:
            by_bucket.append(["cell"] + [f"count {r['bucket']}" for r in b["frequency"]]
                             + [f"position {r['bucket']}" for r in b["position"]] + ["documents", "worst", "best"])
        docs = sorted(b["documents"] or [], key=lambda r: r["kld_mean"])
        by_bucket.append([c["cell"]["label"]] + [_kld(r) for r in b["frequency"] + b["position"]]
                         + ([str(len(docs)), f"#{docs[-1]['document']}: {docs[-1]['kld_mean']:.4f}",
                             f"#{docs[0]['document']}: {docs[0]['kld_mean']:.4f}"] if docs else ["-"] * 3))
    errors = [["cell", "task", "lost (right in the original, wrong here)", "gained", "first lost item (end of prompt)"]]
    for c in cells:
        for t in (c.get("tasks") or {}).values():
            row = t["rows"][0]
            first = (row.get("lost_prompts") or ["-"])[0].replace("\n", " ⏎ ")[-160:]
            errors.append([c["cell"]["label"], row["task"], str(len(row.get("lost", []))), str(len(row.get("gained", []))), first])
    out = {"Cells": rows, "Ablations (each axis, averaged over the others)": ablation}
    if by_bucket:
        out["Error analysis: mean KLD by bucket (tokens in each)"] = by_bucket
    out["Error analysis: task items"] = errors
    return out


def _kld(row: dict[str, Any]) -> str:
    return "-" if row["kld_mean"] is None else f"{row['kld_mean']:.4f} ({row['tokens']})"


def write_report(run: str | Path) -> list[Path]:
    """``report.md`` (+ PNGs) and the self-contained ``report.html`` under ``RUN_DIR/report``."""
    original, cells = load_run(run)
    folder = Path(run) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    pngs = figures(original, cells)
    tabs = tables(original, cells)
    md = [f"# Experiment report: {len(cells)} cells\n"]
    for title, rows in tabs.items():
        md += [f"## {title}\n", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        md += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    for name, data in pngs.items():
        (folder / f"{name}.png").write_bytes(data)
        md.append(f"![{name}]({name}.png)\n")
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>quantdeploy experiment</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%;display:block;margin:1em 0}</style>",
            f"</head><body><h1>Experiment report: {len(cells)} cells</h1>"]
    for title, rows in tabs.items():
        page.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in rows[0]) + "</tr>")
        page += ["<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows[1:]]
        page.append("</table>")
    page.append("<h2>Plots</h2>")
    for name, data in pngs.items():  # onload/onerror mark each image, so a headless browser can check them
        page.append(f"<img alt='{name}' onload=\"this.dataset.loaded='1'\" onerror=\"this.dataset.failed='1'\" "
                    f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    page.append("</body></html>")
    paths = [folder / "report.md", folder / "report.html"]
    for path, text in zip(paths, ("\n".join(md), "\n".join(page))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths + [folder / f"{n}.png" for n in pngs]
