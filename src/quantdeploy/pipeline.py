"""The pipeline's stages on a :class:`ModelBundle`: quantize, save, load (quantized or not), generate.

This is the one module that touches every layer: it asks ``quant`` for quantized weights, swaps them
into a copy of the model as ``engine`` modules, and hands tensors and configs to ``formats``. The
stages themselves hold no state; each takes a bundle (or a path) and returns a new one.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantdeploy.config import Config
from quantdeploy.device import default_device, resolve_device
from quantdeploy.engine.quant_linear import QuantEmbedding, QuantLinear
from quantdeploy.errors import CheckpointError, ConfigError
from quantdeploy.formats import checkpoint as ckpt
from quantdeploy.models.bundle import ModelBundle, SourceInfo
from quantdeploy.models.loading import load_model
from quantdeploy.quant import kv_cache as kv
from quantdeploy.quant.apply import Progress, quantize_weights
from quantdeploy.quant.calibration import load_calibration
from quantdeploy.quant.kv_cache import KVCacheConfig
from quantdeploy.quant.mixed import MixedConfig, plan_mixed, windows
from quantdeploy.quant.mixed.sensitivity import end_to_end_kld
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.spec import QuantSpec

log = logging.getLogger(__name__)


def quantize(bundle: ModelBundle, config: Config, seed: int = 0, progress: Progress | None = None,
             device: torch.device | str | None = None, kv_cache: KVCacheConfig | None = None,
             mixed: MixedConfig | None = None) -> ModelBundle:
    """A new bundle whose target modules are quantized per ``config``; ``bundle`` is left untouched.

    Calibrated methods (GPTQ ...) read their data through the bundle's tokenizer and run block by block
    on ``device`` (default: the GPU when there is one). With ``kv_cache``, the keys and values get
    static per-head scales measured on the weight-quantized model (``quant/kv_cache.py``). With
    ``mixed``, each layer's spec is chosen by measured sensitivity under a bit budget (``quant/mixed``),
    and the model's real KLD on the sensitivity windows is measured next to the prediction.
    """
    torch.manual_seed(seed)
    device = resolve_device(device) if device is not None else None
    if kv_cache is not None:  # bad calibration data is reported before any work
        kv_calib = load_calibration(bundle.tokenizer, kv_cache.calibration, needed_by="a quantized KV cache")
    specs, mixed_record = None, None
    if mixed is not None:
        specs, mixed_record = plan_mixed(bundle.model, bundle.tokenizer, config, mixed, progress)
    # Work on a copy: transforms such as AWQ edit weights and norms, and the copy becomes the result.
    model = copy.deepcopy(bundle.model)
    weights, record = quantize_weights(model, config, progress, tokenizer=bundle.tokenizer, device=device,
                                       specs=specs)
    for name, qw in weights.items():
        _set_submodule(model, name, _quant_module(model.get_submodule(name), qw))
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now has its own (quantized) weight
    linears = [n for n, m in bundle.model.named_modules() if isinstance(m, nn.Linear)]
    quant_config = {
        "method": config.to_dict(),
        "seed": seed,
        **record,
        "modules": {name: qw.spec.to_dict() for name, qw in weights.items()},
        "ignore": [n for n in linears if n not in weights],
    }
    if mixed_record is not None:  # the model as the method quantized it (not the search's weights), measured
        tokens, validation = windows(bundle.tokenizer, mixed)
        mixed_record["measured_kld"] = end_to_end_kld(bundle.model, model, tokens)
        log.info("mixed precision: measured KLD %.4f on the sensitivity windows", mixed_record["measured_kld"])
        if "progressive" in mixed_record:  # and on the windows the accuracy budget was checked on
            mixed_record["progressive"]["shipped_kld"] = end_to_end_kld(bundle.model, model, validation)
            log.info("mixed precision: the saved model's validation KLD %.4f (the search measured %.4f)",
                     mixed_record["progressive"]["shipped_kld"], mixed_record["progressive"]["measured_kld"])
        quant_config["mixed"] = mixed_record
    if kv_cache is not None:
        _calibrate_kv(model, quant_config, kv_cache, kv_calib, device)
    return ModelBundle(model=model.eval(), tokenizer=bundle.tokenizer, source=bundle.source, quant_config=quant_config)


def quantize_kv_cache(bundle: ModelBundle, kv_cache: KVCacheConfig,
                      device: torch.device | str | None = None) -> ModelBundle:
    """A new bundle that also quantizes the KV cache of an already weight-quantized ``bundle``."""
    if bundle.quant_config is None:
        raise ConfigError("quantize the weights first (the KV scales are measured on the quantized model)")
    if "kv_cache" in bundle.quant_config:
        raise ConfigError("this model's KV cache is already quantized; start from its weight-only checkpoint")
    calib = load_calibration(bundle.tokenizer, kv_cache.calibration, needed_by="a quantized KV cache")
    model, quant_config = copy.deepcopy(bundle.model), copy.deepcopy(bundle.quant_config)
    _calibrate_kv(model, quant_config, kv_cache, calib, resolve_device(device) if device is not None else None)
    return ModelBundle(model=model.eval(), tokenizer=bundle.tokenizer, source=bundle.source, quant_config=quant_config)


def _calibrate_kv(model: nn.Module, quant_config: dict, kv_cache: KVCacheConfig, calib, device) -> None:
    kv.calibrate(model, calib.tokens, device or default_device(), kv_cache)
    quant_config["kv_cache"] = {**kv_cache.to_dict(), "calibration_data": calib.record()}


def _quant_module(original: nn.Module, qw: QuantizedWeight) -> nn.Module:
    dtype = original.weight.dtype
    if isinstance(original, nn.Embedding):
        return QuantEmbedding.from_quantized(qw, dtype)
    return QuantLinear.from_quantized(qw, original.bias, dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear | QuantEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def save(bundle: ModelBundle, path: str | Path, overwrite: bool = False) -> int:
    """Write ``bundle`` as a quantdeploy checkpoint folder (atomically); returns its size in bytes."""
    if bundle.quant_config is None:
        raise CheckpointError("this model is not quantized; run quantize first (or save it with transformers)")
    import transformers

    from quantdeploy import __version__

    tensors, aliases = _dedupe(bundle.model.state_dict())
    manifest = {
        "quantdeploy_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": bundle.quant_config.get("seed"),
        "calibration_sha256": bundle.quant_config.get("calibration_sha256"),
        "source": bundle.source.to_dict(),
    }

    def write_extra(folder: Path) -> None:
        bundle.model.config.save_pretrained(folder)
        if getattr(bundle.model, "generation_config", None) is not None:
            bundle.model.generation_config.save_pretrained(folder)
        bundle.tokenizer.save_pretrained(folder)

    return ckpt.write_checkpoint(Path(path), tensors, {**bundle.quant_config, "aliases": aliases}, manifest,
                                 write_extra, overwrite=overwrite)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied weights) once; ``aliases`` maps dropped → kept name."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu()
    return tensors, aliases


def load(path: str | Path, adapter: str | Path | None = None, device: str = "cpu") -> ModelBundle:
    """Load a quantdeploy checkpoint, or any source that :func:`load_model` accepts."""
    p = Path(path).expanduser()
    if ckpt.is_checkpoint(p):
        if adapter is not None:
            raise CheckpointError("an adapter merges into the unquantized base; pass --adapter when quantizing")
        return load_quantized(p, device)
    bundle = load_model(path, adapter=adapter)
    bundle.model.to(device)
    return bundle


def load_quantized(path: Path, device: str = "cpu") -> ModelBundle:
    """Rebuild a quantized model from its checkpoint folder, validating shapes and dtypes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quant_config, manifest = ckpt.read_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from config.json ({err}); re-run quantize") from None
    for name, spec_dict in quant_config.get("modules", {}).items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quant_config.json names module '{name}', which the model lacks") from None
        spec = QuantSpec.from_dict(spec_dict)
        out_features, in_features = original.weight.shape
        if isinstance(original, nn.Embedding):
            module: nn.Module = QuantEmbedding(out_features, in_features, spec, original.weight.dtype)
        else:
            module = QuantLinear(in_features, out_features, spec, original.bias is not None, original.weight.dtype)
        _set_submodule(model, name, module)
    if "kv_cache" in quant_config:
        try:
            kv.install(model, quant_config["kv_cache"].get("dtype"))  # scale buffers, filled below
        except ConfigError as err:
            raise CheckpointError(f"{path}: quant_config.json kv_cache: {err}") from None
    tensors = ckpt.load_tensors(path)
    _check_tensors(model, tensors, path)
    aliases: dict[str, str] = quant_config.get("aliases", {})
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: tensor shapes do not match the model ({str(err).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{path}: model.safetensors does not match the model ({what}); re-run quantize")
    for dropped, kept in aliases.items():
        owner, _, attr = dropped.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    source = SourceInfo(**manifest.get("source", {"path": str(path), "kind": "quantdeploy"}))
    return ModelBundle(model=model.to(device).eval(), tokenizer=tokenizer, source=source,
                       quant_config=quant_config, folder=path)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Quantized buffers must match their layout in dtype too (load_state_dict would silently cast)."""
    for name, module in quantized_modules(model).items():
        for buf_name, buf in module.named_buffers(recurse=False):
            key = f"{name}.{buf_name}"
            if key in tensors and tensors[key].dtype != buf.dtype:
                raise CheckpointError(f"{path}: {key} is {tensors[key].dtype}, expected {buf.dtype}; re-run quantize")


@torch.inference_mode()
def generate(bundle: ModelBundle, prompt: str, max_new_tokens: int = 32, chat: bool = False) -> tuple[str, list[int]]:
    """Greedy continuation of ``prompt`` (transformers' generate; the engine replaces this later)."""
    tok = bundle.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    device = next(bundle.model.parameters()).device
    out = bundle.model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def describe(bundle: ModelBundle) -> dict[str, Any]:
    """Per-module spec, bits per weight and bytes of a quantized bundle (for ``inspect``)."""
    rows = []
    for name, module in quantized_modules(bundle.model).items():
        qw = module.quantized_weight()
        rows.append({"module": name, "spec": qw.spec.describe(), "shape": list(qw.shape),
                     "bits_per_weight": round(qw.bits_per_weight, 3), "bytes": qw.nbytes})
    n_weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    n_bytes = sum(r["bytes"] for r in rows)
    return {"modules": rows, "quantized_weights": n_weights,
            "kv_cache": ((bundle.quant_config or {}).get("kv_cache") or {}).get("dtype"),
            "bits_per_weight": 8.0 * n_bytes / n_weights if n_weights else None,
            "ignored": (bundle.quant_config or {}).get("ignore", [])}
