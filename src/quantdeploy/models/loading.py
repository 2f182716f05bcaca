"""Load a source model: a Hugging Face checkpoint folder, a GGUF file, a hub name, or the bundled one.

Any causal LM that transformers can build is accepted; its ``nn.Linear`` layers are what the generic
quantization path targets. An optional PEFT LoRA adapter is merged into the base weights right after
loading. This module only loads unquantized sources; quantdeploy checkpoints are read by
``quantdeploy.formats`` and assembled by ``quantdeploy.pipeline``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from quantdeploy.errors import ModelSourceError
from quantdeploy.models.bundle import ModelBundle, SourceInfo
from quantdeploy.models.bundled import BUNDLED_NAME, bundled_gguf_path
from quantdeploy.models.gguf import gguf_to_folder
from quantdeploy.models.hashing import folder_sha256

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(path: str | Path) -> tuple[Path | str, SourceInfo]:
    """Where to load a source from, without loading it: a local folder, or a hub name."""
    text = str(path)
    if text == BUNDLED_NAME:
        path = bundled_gguf_path()
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{p} is a file but not a .gguf; pass a checkpoint folder or a .gguf file")
        folder, digest = gguf_to_folder(p)
        return folder, SourceInfo(path=str(p), kind="gguf", sha256=digest)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(
                f"{p} is not a model folder (no config.json); pass a Hugging Face checkpoint folder, "
                "a .gguf file or a quantdeploy checkpoint"
            )
        return p, SourceInfo(path=str(p), kind="hf-folder", sha256=folder_sha256(p))
    if _looks_like_hub_name(text):
        return text, SourceInfo(path=text, kind="hub")
    raise ModelSourceError(f"no such file or folder: {text}")


def _looks_like_hub_name(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: str | None = None) -> ModelBundle:
    """Load an unquantized causal LM and its tokenizer; merge a LoRA adapter if one is given.

    ``path``: a checkpoint folder, a ``.gguf`` file, a hub name (offline: from the local cache) or
    ``"bundled"``. ``dtype``: float32/bfloat16/float16, default the checkpoint's own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, source = resolve_source(path)
    if dtype is not None and dtype not in DTYPES:
        raise ModelSourceError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype] if dtype else "auto"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelSourceError(f"cannot load model from {source.path}: {_first_line(err)}") from None
    model.eval()
    if adapter is not None:
        model, source.adapter = merge_lora(model, Path(adapter))
    return ModelBundle(model=model, tokenizer=tokenizer, source=source,
                       folder=where if isinstance(where, Path) else None)


def merge_lora(model: torch.nn.Module, adapter: Path) -> tuple[torch.nn.Module, dict]:
    """Merge a PEFT LoRA adapter folder into ``model``; returns the plain merged model."""
    if importlib.util.find_spec("peft") is None:
        raise ModelSourceError("merging a LoRA adapter needs the 'peft' package; run: pip install peft")
    if not adapter.is_dir():
        raise ModelSourceError(f"no such adapter folder: {adapter}")
    if not (adapter / "adapter_config.json").is_file():
        raise ModelSourceError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    from peft import PeftModel

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelSourceError(f"{adapter} holds a {config.get('peft_type')} adapter; only LoRA adapters merge")
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelSourceError(f"cannot merge adapter {adapter}: {_first_line(err)}") from None
    log.info("merged LoRA adapter %s (r=%s)", adapter, config.get("r"))
    info = {"path": str(adapter), "sha256": folder_sha256(adapter, ("*.safetensors", "*.bin", "adapter_config.json"))}
    return merged.eval(), info


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
