"""The demo: quantize one model with several methods, reload each from disk, and compare all of them
with the original on held-out text. What ``quantdeploy demo`` runs on the bundled SmolLM2-135M.

The methods avoid asymmetric int4 group 32, the grid the bundled model's weights already sit on
(they were stored as Q4_1), which would show zero loss for the wrong reason.
"""

from __future__ import annotations

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


def run_demo(model: str, text: str | Path, protocol: EvalProtocol, out: Path,
             progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (original first) and metadata for the report; checkpoints land in ``out/checkpoints``."""
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
    rows = compare(bundles, base, str(text), protocol, progress=progress)
    for row in rows:
        row["quantize_s"] = timings.get(row["name"])
    meta = {"model": model, "source": base.source.to_dict(), "text": str(text), "protocol": protocol.to_dict(),
            "methods": {name: config.to_dict() for name, config in DEMO_METHODS},
            "seconds": round(time.perf_counter() - started, 1), **machine_info()}
    return rows, meta
