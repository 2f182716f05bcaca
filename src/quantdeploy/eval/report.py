"""Comparison reports: rows of (model, bits per weight, size, perplexity, KL stats) as a table,
Markdown, JSON and a plot. Rendering only; the numbers come from :mod:`quantdeploy.eval.fidelity`.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from rich.table import Table

COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"),
    ("spec", "spec", "{}"),
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("ppl", "PPL", "{:.3f}"),
    ("kld_mean", "mean KLD", "{:.5f}"),
    ("kld_median", "median KLD", "{:.5f}"),
    ("kld_p99", "p99 KLD", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.2%}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def rich_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="left" if key in ("name", "spec") else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in COLUMNS))
    return table


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def git_commit() -> str | None:
    """The commit of the quantdeploy source tree when it is a git checkout, with ``-dirty`` appended
    when tracked files differ from it (so a benchmark record says whether it came from that commit)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def machine_info() -> dict[str, Any]:
    import torch

    return {"commit": git_commit(), "machine": platform.machine(), "processor": platform.processor() or None,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(folder: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """``report.json``, ``report.md`` and (with matplotlib) ``kld_vs_bits.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    path = folder / "report.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    written.append(path)
    path = folder / "report.md"
    protocol = meta.get("protocol", {})
    path.write_text(
        "# quantdeploy report\n\n"
        f"Model: `{meta.get('model')}`. Text: `{meta.get('text')}`, {protocol.get('max_tokens')} tokens, "
        f"{protocol.get('window')}-token windows. KL divergence is to the original model.\n\n"
        + markdown_table(rows) + "\n"
    )
    written.append(path)
    plot = plot_kld_vs_bits(folder / "kld_vs_bits.png", rows)
    if plot:
        written.append(plot)
    return written


def plot_kld_vs_bits(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Mean KLD against bits per weight, one labelled point per method; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [r for r in rows if r.get("kld_mean") and r.get("bits_per_weight")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in points:
        ax.scatter(r["bits_per_weight"], r["kld_mean"])
        ax.annotate(r["name"], (r["bits_per_weight"], r["kld_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers, scales included)")
    ax.set_ylabel("mean KL divergence to the original")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
