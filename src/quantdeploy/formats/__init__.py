"""Checkpoint formats: the canonical quantdeploy folder (``checkpoint.py``) and one exporter per format
that other engines load (``compressed_tensors.py``: vLLM, transformers, llm-compressor). ``export``
picks the exporter by name; an unknown name is an error that lists the known ones."""

from __future__ import annotations

import importlib
from pathlib import Path

from quantdeploy.errors import ConfigError
from quantdeploy.formats.checkpoint import FORMAT_VERSION, is_checkpoint, read_checkpoint, write_checkpoint

#: export format name -> module with ``export(source, out, overwrite) -> bytes written``
EXPORTERS = {"compressed-tensors": "quantdeploy.formats.compressed_tensors"}


def export(checkpoint: str | Path, out: str | Path, format: str = "compressed-tensors", overwrite: bool = False) -> int:
    """Write the quantdeploy checkpoint folder ``checkpoint`` in ``format`` to the folder ``out``
    (atomically; a spec the format cannot hold exactly is refused before anything is written).
    Returns the size of ``out`` in bytes."""
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format '{format}'; available: {', '.join(EXPORTERS)}")
    return importlib.import_module(EXPORTERS[format]).export(checkpoint, out, overwrite=overwrite)


__all__ = ["EXPORTERS", "FORMAT_VERSION", "export", "is_checkpoint", "read_checkpoint", "write_checkpoint"]
