"""The demo: quantize one model with several methods, reload each from disk, and compare all of them
with the original on held-out text. What ``quantdeploy demo`` runs on the bundled SmolLM2-135M.

It ends with the experiment page (``bench/experiment_report.py``) for the same models: the comparison's
fidelity (with the KLD cut by bucket), a multiple-choice task paired against the original (``data/
demo_task.json``: 40 everyday questions we wrote for the demo, not a benchmark), size, decode speed on
this machine, per-layer error and attention similarity, written as an experiment run under
``out/experiment`` so ``quantdeploy report`` can redraw it.

The methods avoid asymmetric int4 group 32, the grid the bundled model's weights already sit on
(they were stored as Q4_1), which would show zero loss for the wrong reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

from quantdeploy.config import Config
from quantdeploy.errors import DataError
from quantdeploy.eval.compare import compare
from quantdeploy.eval.fidelity import EvalProtocol
from quantdeploy.eval.report import machine_info
from quantdeploy.models.loading import load_model
from quantdeploy.pipeline import load, quantize, save
from quantdeploy.quant.methods.fp8 import FP8Config
from quantdeploy.quant.methods.nf4 import NF4Config
from quantdeploy.quant.methods.rtn import RTNConfig

log = logging.getLogger(__name__)

DEMO_METHODS: list[tuple[str, Config]] = [
    ("int8", RTNConfig(bits=8, group_size=None)),
    ("fp8", FP8Config()),
    ("int4-g64", RTNConfig(bits=4, group_size=64)),
    ("nf4", NF4Config(group_size=64, double_quant=True)),
    ("int3-g64", RTNConfig(bits=3, group_size=64)),
]

def default_text_path() -> Path:
    """The held-out text the demo scores: a slice of English Wikipedia that ships in the package
    (``data/README.md`` says where it comes from and its license)."""
    path = Path(__file__).resolve().parent / "data" / "wiki_en_demo.txt"
    if not path.is_file():
        raise DataError(f"the demo text {path} is missing from this installation; reinstall quantdeploy "
                        "or pass --text FILE")
    return path


def demo_task_path() -> Path:
    return Path(__file__).resolve().parent / "data" / "demo_task.json"


def run_demo(model: str, text: str | Path, protocol: EvalProtocol, out: Path,
             progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (original first) and metadata for the report; checkpoints land in ``out/checkpoints``, the
    experiment run in ``out/experiment``."""
    started = time.perf_counter()
    base = load_model(model)
    bundles, timings = {}, {}
    for name, config in DEMO_METHODS:
        t0 = time.perf_counter()
        folder = out / "checkpoints" / name
        save(quantize(base, config), folder, overwrite=True)
        bundles[name] = load(folder)  # evaluate what was written, not what is in memory
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("%s: quantized, saved and reloaded in %.1f s", name, timings[name])
    rows = compare(bundles, base, str(text), protocol, progress=progress, keep_tokens=True)
    for row in rows:
        row["quantize_s"] = timings.get(row["name"])
        row.pop("per_token", None)
    write_experiment(out / "experiment", model, base, bundles, rows, timings, text, protocol)
    meta = {"model": model, "source": base.source.to_dict(), "text": str(text), "protocol": protocol.to_dict(),
            "methods": {name: config.to_dict() for name, config in DEMO_METHODS},
            "seconds": round(time.perf_counter() - started, 1), **machine_info()}
    return rows, meta


def write_experiment(run: Path, model: str, base: Any, bundles: dict[str, Any], rows: list[dict[str, Any]],
                     timings: dict[str, float], text: str | Path, protocol: EvalProtocol) -> None:
    """The demo's models as the cells of an experiment run (see the module docstring)."""
    from quantdeploy.bench.experiment import Cell, _Context, write_atomic
    from quantdeploy.bench.measure import measure_cell

    spec = {"model": model, "text": str(text), "tokens": protocol.max_tokens, "tasks": [str(demo_task_path())],
            "bench": {"batches": [1], "steps": 16, "prompt_len": 64}}
    context = _Context(spec, base)
    configs = dict(DEMO_METHODS)
    cells = [Cell("original", "original", {}, None, None)]
    cells += [Cell(name, name, {"method": name}, configs[name].to_dict(), None) for name in bundles]
    write_atomic(run / "grid.json", {"spec": spec, "cells": [dataclasses.asdict(c) for c in cells[1:]]})
    by_name = {row["name"]: row for row in rows}
    for cell in cells:
        row = by_name[cell.id]
        fidelity = {"fidelity": {k: v for k, v in row.items() if isinstance(v, (int, float))
                                 and k not in ("quantize_s", "bits_per_weight", "size_mb")}}
        if "kld_buckets" in row:
            fidelity["kld_buckets"] = row.pop("kld_buckets")
        bundle = base if cell.method is None else bundles[cell.id]
        result = measure_cell(context, cell, bundle, timings.get(cell.id, 0.0), fidelity)
        write_atomic(run / "cells" / cell.id / "result.json", result)
        if cell.method is None:
            context.original = result
        log.info("%s: tasks, speed and per-layer error measured", cell.label)
