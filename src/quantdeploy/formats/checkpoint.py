"""The quantdeploy checkpoint folder: what is in it, how it is written atomically and validated.

A checkpoint folder holds:

- ``model.safetensors``: every tensor of the model. Quantized modules store their canonical tensors
  (``<module>.qweight``, ``.scales``, ``.zeros`` ...; layouts in ``quant/primitives.py``), other
  modules their ordinary weights. Tensors that alias another (tied embeddings) are stored once.
- ``config.json`` (+ ``generation_config.json``): the model's Hugging Face config.
- the tokenizer files.
- ``quant_config.json``: format name and version, the method config, one spec per quantized module,
  the Linear layers left unquantized (``ignore``) and the aliases.
- ``manifest.json``, written last: versions of quantdeploy/torch/transformers, creation time, seed,
  calibration-data hash, source-model hash, and the size and sha256 of every file.

Writes go to a hidden temporary folder beside the target, which is renamed into place only when
complete, so a crash never leaves a folder that looks valid. Reads check presence, versions, file
sizes against the manifest and the safetensors header, and fail with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantdeploy.errors import CheckpointError
from quantdeploy.models.hashing import file_sha256

FORMAT_NAME = "quantdeploy"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "quant_config.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (WEIGHTS_FILE, QUANT_CONFIG_FILE, MANIFEST_FILE, "config.json")


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / QUANT_CONFIG_FILE).is_file()


def write_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    quant_config: dict[str, Any],
    manifest: dict[str, Any],
    write_extra: Callable[[Path], None],
    overwrite: bool = False,
) -> int:
    """Write a checkpoint folder atomically; returns its size in bytes.

    ``write_extra(folder)`` writes the model config and tokenizer files into the temporary folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another output folder or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write_extra(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / QUANT_CONFIG_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **quant_config})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST_FILE, {"format_version": FORMAT_VERSION, **manifest, "files": files})
        _fsync_folder(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder_size(path)


def read_checkpoint(path: Path, verify_hashes: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate a checkpoint folder and return ``(quant_config, manifest)``; one-line errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint folder: {path}")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete quantdeploy checkpoint: {', '.join(missing)} missing; re-run quantize")
    quant_config = _read_json(path / QUANT_CONFIG_FILE)
    manifest = _read_json(path / MANIFEST_FILE)
    if quant_config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / QUANT_CONFIG_FILE} is not a quantdeploy quant config")
    version = quant_config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format {version}; this quantdeploy reads up to {FORMAT_VERSION}: upgrade it")
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the manifest but missing; re-run quantize")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{file} is truncated or changed ({size} of {info['bytes']} bytes); re-run quantize")
        if verify_hashes and file_sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file} does not match its manifest hash; it is corrupt: re-run quantize")
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path / WEIGHTS_FILE} is not a readable safetensors file ({err}); re-run quantize") from None
    return quant_config, manifest


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a validated checkpoint (safetensors: nothing is unpickled)."""
    out = {}
    try:
        with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt", device=device) as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except Exception as err:
        raise CheckpointError(f"{Path(path) / WEIGHTS_FILE} cannot be read ({err}); it is corrupt: re-run quantize") from None
    return out


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt: re-run quantize") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is corrupt")
    return data


def _fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
