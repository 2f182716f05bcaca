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
complete (swapped with an old checkpoint in one atomic step where Linux allows), so a crash never
leaves a folder that looks valid, nor an absent one where a checkpoint was. ``check_output`` runs before any long work:
the output must be new, or (with overwrite) one of our own checkpoints, and its parent writable; an
unrelated folder or file is never replaced. Reads check presence, versions, file sizes and every file's
sha256 against the manifest, then the safetensors header, and fail with one line. Hashing reads each
file once more: 0.23-0.27 s for the bundled model's 169 MB INT4 g32 folder on a 2-core box with other
jobs running (~0.7 GB/s; reading the tensors then took 0.02 s from the page cache), so some 8 s for an
8B INT4 checkpoint. A checkpoint loaded without it runs flipped bytes as weights (4 MB overwritten went
unnoticed by generate, eval, bench and serve), so every loader pays it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
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
    """A folder written by ``write_checkpoint``: it has our quant config or our manifest (a folder that
    lost one of them is still ours, and ``read_checkpoint`` says what is missing)."""
    path = Path(path)
    return path.is_dir() and ((path / QUANT_CONFIG_FILE).is_file() or (path / MANIFEST_FILE).is_file())


def check_output(path: Path, overwrite: bool = False, ours: Callable[[Path], bool] = is_checkpoint,
                 what: str = f"quantdeploy checkpoint (no {QUANT_CONFIG_FILE} or {MANIFEST_FILE})") -> None:
    """Raise CheckpointError unless a folder can be written at ``path``: it must not exist, or be an
    empty folder, or (with ``overwrite``) be one that ``ours`` recognizes (by default one of our
    checkpoints; ``what`` names it); its parent must be writable. Cheap: call it before the long work."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CheckpointError(f"{path} exists and is not a folder; --overwrite only replaces a {what.split(' (')[0]} "
                              "folder: choose another output path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; choose another output folder or pass --overwrite")
        if not ours(path):
            raise CheckpointError(f"{path} is not a {what}; --overwrite only replaces one: choose another output folder")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:  # an unnamed file (O_TMPFILE on Linux): a writer killed here leaves nothing behind
        with tempfile.TemporaryFile(dir=ancestor, prefix=f".{path.name}.probe-"):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write under {ancestor} ({err.strerror or err}); choose another output folder") from None


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

    def write(tmp: Path) -> None:
        write_extra(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / QUANT_CONFIG_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **quant_config})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST_FILE, {"format_version": FORMAT_VERSION, **manifest, "files": files})

    return write_folder(Path(path), write, overwrite)


def write_folder(path: Path, write: Callable[[Path], None], overwrite: bool = False,
                 ours: Callable[[Path], bool] = is_checkpoint, what: str | None = None) -> int:
    """Write a folder atomically: ``write(tmp)`` fills a hidden temporary folder beside ``path``, which
    then replaces ``path`` in one step (``check_output`` with ``ours``/``what`` decides what may be
    replaced). Returns the folder's size in bytes."""
    check_output(path, overwrite, ours, *([what] if what else []))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        _fsync_folder(tmp)
        if path.exists():  # an empty folder, or one of ours (check_output)
            if exchange(tmp, path):  # one atomic swap: the path always holds a complete folder
                shutil.rmtree(tmp)  # which now holds the old one
            else:  # two renames: a crash between them leaves the old one in a hidden .old- folder
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports its own I/O errors (disk full ...) as SafetensorError
        full = getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in str(err)
        reason = "the disk is full" if full else (getattr(err, "strerror", None) or str(err).split(": ")[-1])
        raise CheckpointError(f"cannot write {path}: {reason}; nothing was written there "
                              "(free space or choose another output folder)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder_size(path)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux's ``renameat2`` with ``RENAME_EXCHANGE``); False where the system or
    the file system cannot, and the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(b))


def read_checkpoint(path: Path, verify_hashes: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
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
    for version in (quant_config.get("format_version"), manifest.get("format_version")):
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise CheckpointError(f"{path} uses checkpoint format {version}; this quantdeploy reads 1 to {FORMAT_VERSION}: "
                                  "upgrade it")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(name in files for name in REQUIRED_FILES if name != MANIFEST_FILE):
        raise CheckpointError(f"{path / MANIFEST_FILE} does not list the checkpoint's files; it is corrupt: re-run quantize")
    for name, info in files.items():
        file = path / name
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or "/" in name or name.startswith("."):
            raise CheckpointError(f"{path / MANIFEST_FILE} has a bad entry for '{name}'; it is corrupt: re-run quantize")
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the manifest but missing; re-run quantize")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{file} is truncated or changed ({size} of {info['bytes']} bytes); re-run quantize")
        if verify_hashes and file_sha256(file) != info.get("sha256"):
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
