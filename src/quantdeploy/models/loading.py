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
from quantdeploy.models.gguf import check_gguf, gguf_to_folder
from quantdeploy.models.hashing import folder_sha256

log = logging.getLogger(__name__)

#: files that only a quantdeploy checkpoint folder has (``formats/checkpoint.py`` writes them)
CHECKPOINT_MARKERS = ("quant_config.json", "manifest.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_source(path: str | Path) -> Path | str:
    """The cheap checks of an unquantized source, without reading weights: ``bundled`` is installed, a
    file is a .gguf, a folder has a config.json and is not one of our checkpoints, anything else looks
    like a hub name. Returns the local path, or the hub name."""
    text = str(path)
    if text == BUNDLED_NAME:
        path = bundled_gguf_path()
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{p} is a file but not a .gguf; pass a checkpoint folder or a .gguf file")
        check_gguf(p)
        return p
    if p.is_dir():
        if any((p / marker).is_file() for marker in CHECKPOINT_MARKERS):
            raise ModelSourceError(f"{p} is a quantdeploy checkpoint (already quantized); quantize the original model "
                                   "it came from (its manifest.json names it), or run this one with eval/generate/serve")
        if not (p / "config.json").is_file():
            raise ModelSourceError(
                f"{p} is not a model folder (no config.json); pass a Hugging Face checkpoint folder, "
                "a .gguf file or a quantdeploy checkpoint"
            )
        return p
    if _looks_like_hub_name(text):
        return text
    raise ModelSourceError(f"no such file or folder: {text}")


def resolve_source(path: str | Path) -> tuple[Path | str, SourceInfo]:
    """Where to load a source from, without loading it: a local folder (a GGUF file is converted to one,
    once), or a hub name."""
    where = check_source(path)
    if isinstance(where, str):
        return where, SourceInfo(path=where, kind="hub")
    if where.is_file():
        folder, digest = gguf_to_folder(where)
        return folder, SourceInfo(path=str(where), kind="gguf", sha256=digest)
    return where, SourceInfo(path=str(where), kind="hf-folder", sha256=folder_sha256(where))


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
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # RuntimeError: weights of the wrong shape
        raise ModelSourceError(f"cannot load model from {source.path}: {_first_line(err)}") from None
    _check_loaded_exactly(info, source.path)
    model.eval()
    if adapter is not None:
        model, source.adapter = merge_lora(model, Path(adapter))
    return ModelBundle(model=model, tokenizer=tokenizer, source=source,
                       folder=where if isinstance(where, Path) else None)


def _check_loaded_exactly(info: dict, where: str) -> None:
    """transformers fills weights the files lack with random values and drops the ones it has no place
    for, with a warning. A model that did not load exactly is never quantized or run: refuse it."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in sorted(info.get("mismatched_keys") or ())]
    quantized = [k for k in unexpected if k.endswith((".qweight", ".scales", ".zeros"))]
    if quantized:
        raise ModelSourceError(f"{where} holds quantized weights (e.g. {quantized[0]}) but no quantdeploy "
                               "quant_config.json; quantize the original model, or restore the checkpoint's "
                               "quant_config.json and manifest.json")
    if missing:
        what = f"{len(missing)} weights missing (e.g. {missing[0]})"
    elif mismatched:
        what = f"{len(mismatched)} weights of the wrong shape (e.g. {mismatched[0]})"
    elif unexpected:
        what = f"{len(unexpected)} weights the model has no place for (e.g. {unexpected[0]})"
    else:
        return
    raise ModelSourceError(f"{where} does not match its config.json: {what}; transformers would fill the gaps "
                           "with random values. Pass a complete checkpoint folder")


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
        detail = _first_line(err)
        hint = "; was it trained on another base model?" if "shape" in detail else ""
        raise ModelSourceError(f"cannot merge adapter {adapter}: {detail}{hint}") from None
    log.info("merged LoRA adapter %s (r=%s)", adapter, config.get("r"))
    info = {"path": str(adapter), "sha256": folder_sha256(adapter, ("*.safetensors", "*.bin", "adapter_config.json"))}
    return merged.eval(), info


def _first_line(err: BaseException) -> str:
    """The line of an exception that names the cause. PyTorch's and transformers' state-dict errors open
    with a header ("Error(s) in loading state_dict for PeftModel:") and put the cause on the next line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "ignore_mismatched_sizes" in lines[0]:
        return "some weights have a different shape than its config.json says"
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        cause = lines[1]
        return cause.replace("copying a param with shape", "the file has shape").replace(
            "from checkpoint, the shape in current model is", "while the model needs").rstrip(".")
    return lines[0]
