"""Build the engine's model (``models/llama.py``) from any source quantdeploy reads.

- a quantdeploy checkpoint folder: tensors read straight from ``model.safetensors`` (no transformers
  model is built), ``QuantLinear`` / ``QuantEmbedding`` wherever ``quant_config.json`` names a spec,
  the static KV-cache scales when the checkpoint has them;
- anything ``load_model`` accepts (HF folder, GGUF, hub name, ``bundled``, + LoRA adapter): loaded by
  transformers, its state dict renamed;
- an in-memory ``ModelBundle`` (e.g. straight out of ``quantize``).

Names are mapped by ``models/hf_names.py``. After loading, q/k/v and gate/up are fused into one
matmul each where their weights allow (same spec, row-separable tensors), the RoPE tables are built
for the target device, and quantized layers are prepared for that device's kernels.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantdeploy.engine.quant_linear import QuantEmbedding, QuantLinear
from quantdeploy.errors import CheckpointError, ModelSourceError
from quantdeploy.formats import checkpoint as ckpt
from quantdeploy.models.bundle import ModelBundle
from quantdeploy.models.hf_names import convert_state_dict, our_module
from quantdeploy.models.llama import ModelArgs, Transformer, rope_tables
from quantdeploy.quant import nf4
from quantdeploy.quant.primitives import QuantizedWeight
from quantdeploy.quant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    hf_config: Any
    quant_config: dict | None
    kv_cache_dtype: str | None  # int8 / fp8_e4m3 when the checkpoint quantizes the KV cache


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         adapter: str | Path | None = None, backend: str = "auto") -> LoadedModel:
    """The engine model for a checkpoint folder, HF folder, GGUF file, hub name or ``bundled``."""
    p = Path(path).expanduser()
    if ckpt.is_checkpoint(p):
        from transformers import AutoConfig, AutoTokenizer

        if adapter is not None:
            raise CheckpointError("an adapter merges into the unquantized base; pass --adapter when quantizing")
        quant_config, _ = ckpt.read_checkpoint(p)
        try:
            hf_config = AutoConfig.from_pretrained(p)
            tokenizer = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{p}: cannot read config.json / tokenizer ({err}); re-run quantize") from None
        args = ModelArgs.from_hf(hf_config)  # unsupported architectures fail before any weight is read
        tensors = ckpt.load_tensors(p)
        for dropped, kept in quant_config.get("aliases", {}).items():
            tensors[dropped] = tensors[kept]
        model = build(args, hf_config, tensors, quant_config, dtype, device, backend)
        return LoadedModel(model, tokenizer, hf_config, quant_config, (quant_config.get("kv_cache") or {}).get("dtype"))
    from quantdeploy.models.loading import load_model, resolve_source

    where, _ = resolve_source(path)
    check_config(where, path)  # refuse other architectures before loading weights
    return from_bundle(load_model(path, adapter=adapter), device, dtype, backend)


def check_config(where: Path | str, shown: str | Path) -> None:
    """Read the model config at ``where`` and refuse, in one line, one the engine cannot build."""
    from transformers import AutoConfig

    try:
        ModelArgs.from_hf(AutoConfig.from_pretrained(where))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read the model config of {shown}: {str(err).splitlines()[0]}") from None


def from_bundle(bundle: ModelBundle, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                backend: str = "auto") -> LoadedModel:
    """The engine model for an in-memory bundle (quantized or not); the bundle's tensors are shared."""
    hf_config = bundle.model.config
    args = ModelArgs.from_hf(hf_config)
    tensors = dict(bundle.model.state_dict())
    quant_config = bundle.quant_config
    model = build(args, hf_config, tensors, quant_config, dtype, device, backend)
    kv = ((quant_config or {}).get("kv_cache") or {}).get("dtype")
    return LoadedModel(model, bundle.tokenizer, hf_config, quant_config, kv)


def build(args: ModelArgs, hf_config: Any, hf_tensors: dict[str, torch.Tensor], quant_config: dict | None,
          dtype: torch.dtype | None, device: torch.device | str, backend: str = "auto") -> Transformer:
    """Assemble, load, fuse and place the model from HF-named tensors and per-module specs; quantized
    layers are prepared for ``backend`` (see ``kernels``) on ``device``."""
    tensors, unknown = convert_state_dict(hf_tensors)
    if unknown:
        raise CheckpointError(f"tensor '{unknown[0]}' has no place in the engine's {args.n_layers}-layer model; "
                              "is this a Llama-family checkpoint?")
    with torch.device("meta"):
        model = Transformer(args)
    compute_dtype = dtype or tensors["norm.weight"].dtype
    for hf_name, spec_dict in ((quant_config or {}).get("modules") or {}).items():
        _swap_quantized(model, hf_name, QuantSpec.from_dict(spec_dict), compute_dtype)
    if "output.weight" not in tensors and "output.qweight" not in tensors:
        _tie_output(model, tensors)
    scales = {name: tensors.pop(name) for name in [n for n in tensors if n.endswith(("k_scale", "v_scale"))]}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise CheckpointError(f"the checkpoint's tensors do not fit the model ({detail[:200]}); re-run quantize") from None
    for name, scale in scales.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, scale.float())
    _cast_float_params(model, compute_dtype)
    for module in model.modules():
        if hasattr(module, "fuse"):
            module.fuse(fuse_linears)
    model.set_rope(*rope_tables(hf_config, args.max_seq_len))
    model.to(device)
    for name, scale in scales.items():  # plain attributes: moved by hand
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, scale.float().to(device))
    dense: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if module.prepare(backend) == "dense":
                spec = module.spec.describe()
                dense[spec] = dense.get(spec, 0) + module.prepared.read_bytes
        elif isinstance(module, QuantEmbedding) and module.spec.dtype == "nf4":
            nf4.tables_on(device)  # the lookup tables on the device before the decode step compiles
    for spec, nbytes in dense.items():
        log.warning("%s has no kernel on %s: its layers are held dequantized in %s (%.3f GB), as fast as "
                    "the unquantized model, not smaller (backend='reference' keeps the codes only, slowly)",
                    spec, torch.device(device).type, str(compute_dtype).replace("torch.", ""), nbytes / 1e9)
    # inference only: nothing asks for gradients, so compiling a step never traces a backward (our
    # registered kernels have none)
    return model.eval().requires_grad_(False)


def _swap_quantized(model: Transformer, hf_name: str, spec: QuantSpec, dtype: torch.dtype) -> None:
    ours = our_module(hf_name)
    if ours is None:
        raise CheckpointError(f"quant_config.json names module '{hf_name}', which the engine's model lacks")
    original = model.get_submodule(ours)
    with torch.device("meta"):
        if isinstance(original, nn.Embedding):
            module: nn.Module = QuantEmbedding(original.num_embeddings, original.embedding_dim, spec, dtype)
        else:
            module = QuantLinear(original.in_features, original.out_features, spec, original.bias is not None, dtype)
    parent, _, child = ours.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _tie_output(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Tied embeddings: the output head reads the embedding's tensors (quantized or not)."""
    if isinstance(model.tok_embeddings, QuantEmbedding):
        emb = model.tok_embeddings
        with torch.device("meta"):
            model.output = QuantLinear(emb.embedding_dim, emb.num_embeddings, emb.spec, False, emb.compute_dtype)
    for name in [n for n in tensors if n.startswith("tok_embeddings.")]:
        tensors["output." + name.split(".", 1)[1]] = tensors[name]


def _cast_float_params(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, (QuantEmbedding, QuantLinear)):
            module.compute_dtype = dtype
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([p(x) for p in parts], -1)``, or None when the parts cannot be fused."""
    with_bias = {p.bias is not None for p in parts}
    if len(with_bias) != 1:
        return None
    bias = torch.cat([p.bias.detach() for p in parts]) if with_bias == {True} else None
    if all(type(p) is nn.Linear for p in parts):
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=bias is not None,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if all(isinstance(p, QuantLinear) for p in parts):
        spec = parts[0].spec
        if any(p.spec != spec for p in parts) or spec.double_quant:  # double-quant scales span rows
            return None
        qws = [p.quantized_weight() for p in parts]
        tensors = {name: torch.cat([qw.tensors[name] for qw in qws]) for name in qws[0].tensors}
        qw = QuantizedWeight(spec, (sum(q.shape[0] for q in qws), qws[0].shape[1]), tensors)
        return QuantLinear.from_quantized(qw, bias, parts[0].bias.dtype if bias is not None else torch.float32)
    return None
