"""Content hashes of model files, used as cache keys and recorded in checkpoint manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "config.json")) -> str:
    """One hash over the weight files and config of a checkpoint folder (sorted by name)."""
    h = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in files:
        h.update(path.name.encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()
