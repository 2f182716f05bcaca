"""ModelBundle: a model, its tokenizer and where it came from, passed between pipeline stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn


@dataclasses.dataclass
class SourceInfo:
    """Where a model came from: ``kind`` is hf-folder, gguf, hub or quantdeploy; ``sha256`` of its weights."""

    path: str
    kind: str
    sha256: str | None = None
    adapter: dict[str, Any] | None = None  # {"path": ..., "sha256": ...} when a LoRA adapter was merged

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelBundle:
    """What the pipeline passes along: a causal LM, its tokenizer, its source and its quantization.

    ``quant_config`` is None for an unquantized model; for a quantized one it is the
    ``quant_config.json`` content (method config and the per-module specs).
    """

    model: nn.Module
    tokenizer: Any
    source: SourceInfo
    quant_config: dict[str, Any] | None = None
    folder: Path | None = None  # the folder it was loaded from, if any
