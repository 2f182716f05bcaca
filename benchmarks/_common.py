"""What the fidelity benchmarks share: their command-line settings (model, calibration and text)."""

from __future__ import annotations

import argparse


def fidelity_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the model, calibration (--calib, --samples, --seq-len), scored text (--text,
    --tokens) and --group-size settings every fidelity benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="bundled")
    p.add_argument("--calib", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--group-size", type=int, default=64)
    return p
