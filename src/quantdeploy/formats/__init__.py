"""Checkpoint formats: the canonical quantdeploy folder (``checkpoint.py``) and one exporter per format
that other engines load (``compressed_tensors.py``: vLLM, transformers, llm-compressor;
``gguf_export.py``: llama.cpp; ``legacy_export.py``: the GPTQ and AWQ layouts). ``export`` picks the
exporter by name; an unknown name is an error that lists the known ones."""

from __future__ import annotations

import importlib
from pathlib import Path

from quantdeploy.errors import ConfigError
from quantdeploy.formats.checkpoint import FORMAT_VERSION, is_checkpoint, read_checkpoint, write_checkpoint

#: export format name -> (module with ``export(source, out, overwrite, **options) -> bytes written``, options)
EXPORTERS = {"compressed-tensors": ("quantdeploy.formats.compressed_tensors", {}),
             "gguf": ("quantdeploy.formats.gguf_export", {}),
             "gptq": ("quantdeploy.formats.legacy_export", {"layout": "gptq"}),
             "awq": ("quantdeploy.formats.legacy_export", {"layout": "awq"})}


def export(checkpoint: str | Path, out: str | Path, format: str = "compressed-tensors", overwrite: bool = False,
           requantize: bool = False) -> int:
    """Write the quantdeploy checkpoint folder ``checkpoint`` in ``format`` to the folder ``out``
    (atomically; a spec the format cannot hold exactly is refused before anything is written, unless
    ``requantize`` asks the GGUF exporter to convert it to the nearest type). Returns the size of ``out``
    in bytes."""
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format '{format}'; available: {', '.join(EXPORTERS)}")
    if requantize and format != "gguf":
        raise ConfigError(f"--requantize applies to the gguf export; {format} never re-quantizes")
    module, options = EXPORTERS[format]
    options = {**options, **({"requantize": True} if requantize else {})}
    return importlib.import_module(module).export(checkpoint, out, overwrite=overwrite, **options)


__all__ = ["EXPORTERS", "FORMAT_VERSION", "export", "is_checkpoint", "read_checkpoint", "write_checkpoint"]
