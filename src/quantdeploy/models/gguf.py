"""GGUF files: dequantized once through transformers' GGUF support, cached as a plain folder.

transformers loads a GGUF with ``gguf_file=`` (needs the ``gguf`` and ``accelerate`` packages) but
refuses to ``save_pretrained`` the result, so the model is re-instantiated from its config without
``quantization_config`` and given the dequantized state dict. The folder lives under the user cache
(``$QUANTDEPLOY_CACHE``, else ``$XDG_CACHE_HOME/quantdeploy``, else ``~/.cache/quantdeploy``) in
``gguf/<sha256 of the file>``, written atomically, so a second load costs one hash.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path

from quantdeploy.errors import ModelSourceError
from quantdeploy.models.hashing import file_sha256

log = logging.getLogger(__name__)

_DONE = ".complete"


def cache_root() -> Path:
    if os.environ.get("QUANTDEPLOY_CACHE"):
        return Path(os.environ["QUANTDEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantdeploy"


def check_gguf(gguf_path: Path) -> None:
    """Refuse a file that is not GGUF by its magic bytes, before hashing, converting or logging anything."""
    try:
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelSourceError(f"cannot read {gguf_path}: {err.strerror or err}") from None
    if magic != b"GGUF":
        raise ModelSourceError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def gguf_to_folder(gguf_path: Path) -> tuple[Path, str]:
    """The cached plain checkpoint folder for ``gguf_path`` and the file's sha256; converts once."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelSourceError(f"loading a GGUF file needs the '{package}' package; run: pip install gguf accelerate")
    check_gguf(gguf_path)
    digest = file_sha256(gguf_path)
    folder = cache_root() / "gguf" / digest[:32]
    if (folder / _DONE).is_file():
        return folder, digest
    log.info("converting %s to a plain checkpoint in %s (once)", gguf_path.name, folder)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _convert(gguf_path, tmp)
        (tmp / _DONE).write_text(digest + "\n")
        if folder.exists():  # a stale, incomplete folder from a crashed run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest


def _convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(f"cannot load GGUF file {gguf_path}: {first}") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain_config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
