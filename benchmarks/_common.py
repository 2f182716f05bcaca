"""What the fidelity benchmarks share: their command-line settings (model, calibration and text)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _model_parser(description: str) -> argparse.ArgumentParser:
    """The model and calibration settings (--calib, --samples, --seq-len) and the scored --text."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="bundled")
    p.add_argument("--calib", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    return p


def fidelity_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the model, calibration, scored text (--text, --tokens) and --group-size settings every
    fidelity benchmark takes."""
    p = _model_parser(description)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--group-size", type=int, default=64)
    return p


def consumer_parser(description: str, windows: int, window: int) -> argparse.ArgumentParser:
    """A parser for the checks that export each method's checkpoint and run it in a consumer: the model,
    calibration, scored text (--windows of --window tokens of --text) and --methods."""
    p = _model_parser(description)
    p.add_argument("--windows", type=int, default=windows)
    p.add_argument("--window", type=int, default=window)
    p.add_argument("--methods", nargs="+", default=None)
    return p


def print_fidelity_table(res: dict, seconds: dict, extra: dict[str, str] | None = None, extra_name: str = "") -> None:
    """The table every fidelity benchmark prints: quantize seconds, PPL, mean KLD, top-1 agreement per model
    (``res`` from ``eval.fidelity.evaluate``), and an optional extra column by model name."""
    width = max(len(n) for n in [*seconds, "original"])
    column = f" {extra_name:>8}" if extra is not None else ""
    print(f"{'model':<{width}} {'quantize s':>10} {'PPL':>9} {'mean KLD':>9}{column} {'top-1':>7}")
    print(f"{'original':<{width}} {'-':>10} {res['original']['ppl']:>9.3f}")
    for name in seconds:
        r = res[name]
        cell = f" {extra.get(name, '-'):>8}" if extra is not None else ""
        print(f"{name:<{width}} {seconds[name]:>10} {r['ppl']:>9.3f} {r['kld_mean']:>9.4f}{cell} {r['top1_agreement']:>7.2%}")


def ensure_peer_venv(venv: Path, what: str, packages: list[str], remove: tuple[str, ...] = ()) -> Path:
    """A peer tool's own virtual environment (``benchmarks/peers``), created on first use: torch first (the
    CPU wheel we use, so pip keeps it), then ``packages``, then ``remove`` uninstalled; its python. The
    request is written beside it: an environment made for other pins is made again, not reused (a
    consumer check run on a stale one measured the wrong thing silently)."""
    import json

    import torch

    python, marker = venv / "bin" / "python", venv / "quantdeploy-peer.json"
    wanted = json.dumps({"torch": torch.__version__.split("+")[0], "packages": packages, "remove": list(remove)})
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"creating the {what} environment {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + ["install", "-q", *packages], check=True)
    if remove:
        subprocess.run(pip + ["uninstall", "-y", "-q", *remove], check=True)
    marker.write_text(wanted)
    return python
