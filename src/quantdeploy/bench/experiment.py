"""``quantdeploy experiment GRID.yaml -o RUN_DIR``: a grid of recipes on one model, every cell measured the
same way, resumable.

The grid file names the model, the measurements and the axes; every combination of the axes is a cell::

    model: bundled                      # any model source
    text: wiki.test.txt                 # fidelity: PPL, KL divergence, top-1 against the original
    tokens: 8192                        # text tokens scored (windows of 1,024)
    calibration: {source: wiki.train.txt, num_samples: 16, seq_len: 512}   # for methods that need data
    tasks: [general_knowledge/task.json] # optional: quantdeploy.eval.tasks specs
    task_limit: 100                     # optional: first N items of each task
    bench: {batches: [1, 8], steps: 16, prompt_len: 64}   # optional: engine decode speed (CPU or GPU)
    grid:
      method: [rtn, gptq, awq]          # any method name (awq wraps rtn; awq+gptq)
      bits: [4, 8]
      group_size: [64, null]            # null: per channel
      symmetric: [true]
      act_order: [true, false]          # GPTQ's column order
      alpha: [0.5, 0.8]                 # SmoothQuant's smoothing strength (method smoothquant)
      calib_samples: [16]               # calibration size (calibrated methods)
      kv_cache: [null, int8]            # KV-cache spec

An axis that a method has no field for is dropped for that method's cells, and cells that come out the
same are run once. Each cell writes ``RUN_DIR/cells/<id>/result.json`` atomically when it is complete
(the original model is the cell ``original``): a rerun skips complete cells, so a killed experiment
resumes where it stopped and never mixes half a cell in. ``quantdeploy report RUN_DIR`` draws the
pictures (``bench/experiment_report.py``). Unknown keys are errors, with the key named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from quantdeploy.errors import ConfigError

log = logging.getLogger(__name__)

TOP_KEYS = {"model", "text", "tokens", "calibration", "tasks", "task_limit", "bench", "grid", "device", "seed"}
AXES = ("method", "bits", "group_size", "symmetric", "act_order", "alpha", "calib_samples", "kv_cache")
QUANTIZER_AXES = ("bits", "group_size", "symmetric", "act_order")  # fields of the (inner) quantizer's config
METHOD_AXES = ("alpha",)  # fields of the outer method's config (SmoothQuant's smoothing strength)
WRAPPERS = ("awq", "smoothquant")


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    label: str
    axes: dict[str, Any]  # the grid values that applied to this cell
    method: dict[str, Any] | None  # a method config's dict (``config_from_dict``); None for the original
    kv_cache: str | None


def read_grid(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"grid file {path} must be a mapping with 'model', 'text' and 'grid'")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ConfigError(f"grid file {path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
    for key in ("model", "text", "grid"):
        if key not in spec:
            raise ConfigError(f"grid file {path}: '{key}' is missing")
    unknown = set(spec["grid"]) - set(AXES)
    if unknown:
        raise ConfigError(f"grid file {path}: unknown axis '{sorted(unknown)[0]}' (axes: {', '.join(AXES)})")
    if "method" not in spec["grid"]:
        raise ConfigError(f"grid file {path}: the grid needs a 'method' axis")
    return spec


def cells(spec: dict[str, Any]) -> list[Cell]:
    """The distinct cells of the grid, in grid order, each with a checked method config."""
    from quantdeploy.config import config_from_dict

    grid = {k: v if isinstance(v, list) else [v] for k, v in spec["grid"].items()}
    names = list(grid)
    out, seen = [], set()
    for values in itertools.product(*(grid[n] for n in names)):
        axes = dict(zip(names, values))
        method, applied = _method_dict(axes, spec.get("calibration") or {})
        kv = axes.get("kv_cache")
        if kv is not None:
            applied["kv_cache"] = kv
            _kv_calibration(spec)
        config_from_dict(method)  # a bad combination fails here, before any work
        key = json.dumps([method, kv], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        label = " ".join(f"{k}={v}" for k, v in applied.items())
        out.append(Cell(hashlib.sha256(key.encode()).hexdigest()[:12], label, applied, method, kv))
    return out


def _method_dict(axes: dict[str, Any], calibration: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from quantdeploy.quant.methods import get_method

    name = str(axes["method"])
    outer, _, inner = name.partition("+")
    if inner and outer not in WRAPPERS:
        raise ConfigError(f"unknown method '{name}' in the grid; only awq and smoothquant compose (awq+gptq)")
    outer_cls = get_method(outer).config_cls
    quantizer_name = (inner or "rtn") if outer in WRAPPERS else outer
    quantizer_cls = get_method(quantizer_name).config_cls
    grid_values = {k: axes[k] for k in QUANTIZER_AXES if k in axes}
    fields = set(quantizer_cls.__dataclass_fields__)
    quantizer = {"type": quantizer_name, **{k: v for k, v in grid_values.items() if k in fields}}
    if "group_size" in quantizer and "pin_group_size" in fields:
        quantizer["pin_group_size"] = True
    applied = {"method": name, **{k: v for k, v in grid_values.items() if k in fields}}
    method = {"type": outer, "quantizer": quantizer} if outer in WRAPPERS else dict(quantizer)
    for k in METHOD_AXES:
        if k in axes and k in outer_cls.__dataclass_fields__:
            method[k] = applied[k] = axes[k]
    if "calibration" in outer_cls.__dataclass_fields__:
        calib = dict(calibration)
        if "calib_samples" in axes:
            calib["num_samples"] = axes["calib_samples"]
            applied["calib_samples"] = axes["calib_samples"]
        if not calib.get("source"):
            raise ConfigError(f"method '{name}' needs calibration data: give 'calibration: {{source: FILE}}' in the grid")
        method["calibration"] = calib
    return method, applied


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run(spec: dict[str, Any], out: str | Path, progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """Run every cell not yet complete under ``out``; returns the result files of all cells."""
    import quantdeploy as qd
    from quantdeploy.bench.measure import measure_cell
    from quantdeploy.config import config_from_dict

    out = Path(out)
    todo = cells(spec)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "grid.json", {"spec": spec, "cells": [dataclasses.asdict(c) for c in todo]})
    paths = [out / "cells" / "original" / "result.json"] + [out / "cells" / c.id / "result.json" for c in todo]
    if all(p.exists() for p in paths):
        return paths
    base = qd.load_model(spec["model"])
    context = _Context(spec, base)
    original = paths[0]
    if not original.exists():
        write_atomic(original, measure_cell(context, Cell("original", "original", {}, None, None), base, 0.0))
    context.original = json.loads(original.read_text())
    for i, (cell, path) in enumerate(zip(todo, paths[1:])):
        if progress:
            progress(i, len(todo), cell.label)
        if path.exists():
            continue
        t0 = time.perf_counter()
        bundle = qd.quantize(base, config_from_dict(cell.method), seed=int(spec.get("seed", 0)))
        if cell.kv_cache:
            kv = qd.KVCacheConfig(cell.kv_cache, qd.CalibrationConfig(**_kv_calibration(spec)))
            bundle = qd.quantize_kv_cache(bundle, kv)
        seconds = time.perf_counter() - t0
        write_atomic(path, measure_cell(context, cell, bundle, seconds))
    if progress:
        progress(len(todo), len(todo), "done")
    return paths


def _kv_calibration(spec: dict[str, Any]) -> dict[str, Any]:
    calib = dict(spec.get("calibration") or {})
    if not calib.get("source"):  # never the evaluation text: that would tune the scales on the test
        raise ConfigError("a kv_cache axis needs calibration data: give 'calibration: {source: FILE}' in the grid")
    return calib


@dataclasses.dataclass
class _Context:
    spec: dict[str, Any]
    base: Any
    original: dict[str, Any] | None = None
