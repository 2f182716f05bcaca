"""Export a quantdeploy checkpoint as a compressed-tensors folder: the format vLLM, transformers and
llm-compressor read.

What it owns: translating each quantized module's canonical tensors (``quant/primitives.py``) into the
tensors and ``quantization_config`` that compressed-tensors (0.17) defines, and refusing, with one line
naming the module and its spec, before anything is written, what that format cannot hold exactly. It
never re-quantizes: every exported weight dequantizes to the weight our checkpoint holds.

The translation, per spec (compressed-tensors stores signed codes ``q_s`` with ``w = (q_s - zp) * s``,
packed with an offset of ``2^(b-1)``; ours stores unsigned codes ``c`` with ``w = (c - z) * s``):

- int4/int8 weight-only, symmetric or not, in groups or per channel (RTN, GPTQ, AWQ): ``pack-quantized``.
  With ``q_s = c - 2^(b-1)`` the packed words hold exactly our codes (eight nibbles per int32 along the
  input axis, the first in the low bits, as our bytes hold them), so ``weight_packed`` is our
  ``qweight`` viewed as int32. Zero points become ``zp = z - 2^(b-1)``, packed along the output axis.
  GPTQ's act-order with static groups needs no ``g_idx``: its groups are contiguous input columns.
- fp8_e4m3 (FP8 W8A8 or weight-only): ``float-quantized``, the fp8 weight and its fp32 scales as stored;
  W8A8 declares dynamic per-token fp8 input activations, as our kernels compute them.
- int8 W8A8 (SmoothQuant, per channel, symmetric): ``int-quantized``, int8 ``weight = c - 128`` and dynamic
  per-token int8 input activations; the smoothing factors are already folded into the exported norms.
- Different specs on different modules: one config group per distinct spec (``mixed-precision`` when
  their formats differ); unquantized Linear layers go to ``ignore``.
- A quantized KV cache (int8 or FP8 E4M3, static, symmetric, one scale per KV head and layer):
  ``kv_cache_scheme`` with the ``attn_head`` strategy and the scales as ``self_attn.k_scale`` /
  ``v_scale`` of shape ``[kv_heads, 1, 1]``, the names and shape compressed-tensors 0.17 registers on
  each attention module. The codes are the same on both sides, saturation included (int8 -128..127).

Refused: NF4 (no compressed-tensors type holds its 16-value table), quantized embeddings, and inputs
whose width is not a whole number of int32 words.

Where a consumer's dequantization differs from ours: our int scales are fp16 and we compute
``(c - z) * s`` in fp32 and round once to the compute dtype. compressed-tensors creates each scale in
the layer's dtype: a consumer loading in fp16 or fp32 holds our scales exactly, one loading in bf16
rounds them to bf16 (8 bits of mantissa instead of 11, a relative change up to 2^-9 per group).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from quantdeploy.errors import CheckpointError
from quantdeploy.formats import checkpoint as ckpt
from quantdeploy.quant.spec import QuantSpec

FORMAT = "compressed-tensors"
#: the compressed-tensors version whose format this writes (the one vLLM CPU 0.32.0 pins)
TARGET_VERSION = "0.17.0"
#: files of the source checkpoint copied unchanged (the tokenizer's and the generation config)
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


KV_TYPES = {"int8": "int", "fp8_e4m3": "float"}  # our KV-cache dtypes -> compressed-tensors' type
KV_SCALES = (".self_attn.k_scale", ".self_attn.v_scale")


def _format_of(spec: QuantSpec) -> str:
    if spec.dtype == "fp8_e4m3":
        return "float-quantized"
    if spec.activations == "int8":
        return "int-quantized"
    return "pack-quantized"


def check_exportable(quant_config: dict[str, Any]) -> None:
    """Raise CheckpointError (one line: the module and what to do) for the first module or setting that
    compressed-tensors cannot hold exactly. Cheap: runs before anything is read or written."""
    kv = quant_config.get("kv_cache") or {}
    if kv and kv.get("dtype") not in KV_TYPES:
        raise CheckpointError(f"the KV cache is {kv.get('dtype')}, which compressed-tensors does not hold; "
                              f"quantize the KV cache as {' or '.join(KV_TYPES)} to export it")
    embed = {n for n, s in quant_config.get("modules", {}).items() if "embed" in n.rsplit(".", 1)[-1]}
    for name, spec_dict in quant_config.get("modules", {}).items():
        spec = QuantSpec.from_dict(spec_dict)
        if name in embed:
            raise CheckpointError(f"{name} is a quantized embedding ({spec.describe()}), which compressed-tensors "
                                  "consumers do not load; quantize without --embeddings to export")
        if spec.dtype == "nf4":
            raise CheckpointError(f"{name} is {spec.describe()}: compressed-tensors has no NF4 type; quantize with "
                                  "RTN/GPTQ/AWQ int4 to export it")
        if spec.dtype not in ("int4", "int8", "fp8_e4m3"):
            raise CheckpointError(f"{name} is {spec.describe()}: vLLM's compressed-tensors schemes take 4 or 8 bits; "
                                  "quantize with int4 or int8 to export it")
        if spec.float_zeros:
            raise CheckpointError(f"{name} is {spec.describe()}: compressed-tensors (and vLLM's kernels) take integer "
                                  "zero points; export to gguf (Q4_1 holds real zero points) or quantize with "
                                  "rtn/gptq/awq --asym")
        if spec.activations == "int8" and (spec.bits != 8 or not spec.symmetric):
            raise CheckpointError(f"{name} is {spec.describe()}: int8 W8A8 exports symmetric 8-bit weights only")
        if spec.activations == "fp8_e4m3" and spec.dtype != "fp8_e4m3":
            raise CheckpointError(f"{name} is {spec.describe()}: fp8 activations with integer weights have no "
                                  "compressed-tensors scheme")


def _weights_args(spec: QuantSpec) -> dict[str, Any]:
    float_ = spec.dtype == "fp8_e4m3"
    args = {"num_bits": 8 if float_ else spec.bits, "type": "float" if float_ else "int",
            "symmetric": True if float_ else spec.symmetric, "dynamic": False, "actorder": None,
            "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    if not args["symmetric"]:
        args["zp_dtype"] = "torch.int8"
    return args


def _activation_args(spec: QuantSpec) -> dict[str, Any] | None:
    if spec.activations is None:
        return None
    float_ = spec.activations == "fp8_e4m3"
    return {"num_bits": 8, "type": "float" if float_ else "int", "symmetric": True, "dynamic": True,
            "strategy": "token", "group_size": None, "actorder": None, "block_structure": None, "observer": None,
            "observer_kwargs": {}}


def _kv_cache_scheme(kv: dict[str, Any] | None) -> dict[str, Any] | None:
    if not kv:
        return None
    return {"num_bits": 8, "type": KV_TYPES[kv["dtype"]], "symmetric": True, "dynamic": False,
            "strategy": "attn_head", "group_size": None, "actorder": None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(quant_config: dict[str, Any], unquantized: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json: one config group per distinct spec, and the KV
    cache's scheme."""
    groups: dict[str, tuple[QuantSpec, list[str]]] = {}
    for name, spec_dict in sorted(quant_config.get("modules", {}).items()):
        spec = QuantSpec.from_dict(spec_dict)
        groups.setdefault(json.dumps(spec.to_dict(), sort_keys=True), (spec, []))[1].append(name)
    config_groups, formats = {}, set()
    for i, (spec, names) in enumerate(groups.values()):
        formats.add(_format_of(spec))
        config_groups[f"group_{i}"] = {"targets": names, "weights": _weights_args(spec),
                                       "input_activations": _activation_args(spec), "output_activations": None,
                                       "format": _format_of(spec)}
    return {"quant_method": FORMAT, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(unquantized),
            "kv_cache_scheme": _kv_cache_scheme(quant_config.get("kv_cache")), "global_compression_ratio": None}


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes [rows, cols]`` packed ``32 // bits`` per int32 along the rows (the first in the low
    bits; rows padded with zeros), as compressed-tensors packs zero points: ``[ceil(rows / p), cols]``."""
    per = 32 // bits
    rows, cols = codes.shape
    padded = torch.zeros(-(-rows // per) * per, cols, dtype=torch.int64)
    padded[:rows] = codes.to(torch.int64)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (padded.view(-1, per, cols) << shifts).sum(dim=1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement of the low 32 bits


def module_tensors(name: str, spec: QuantSpec, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized module, from our canonical ones."""
    out_features, in_features = shape
    if spec.dtype == "fp8_e4m3":
        return {f"{name}.weight": t["qweight"], f"{name}.weight_scale": t["scales"].float()}
    half = 2 ** (spec.bits - 1)
    if spec.activations == "int8":  # int-quantized: signed int8 codes
        return {f"{name}.weight": (t["qweight"].to(torch.int16) - half).to(torch.int8),
                f"{name}.weight_scale": t["scales"]}
    per = 32 // spec.bits
    if in_features % per:
        raise CheckpointError(f"{name}: {in_features} inputs are not a whole number of int32 words of {spec.bits}-bit "
                              "codes; compressed-tensors would pad them: not exported")
    out = {f"{name}.weight_packed": t["qweight"].contiguous().view(torch.int32),
           f"{name}.weight_scale": t["scales"],
           f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not spec.symmetric:
        out[f"{name}.weight_zero_point"] = pack_along_rows(t["zeros"], spec.bits)
    return out


def export(source: str | Path, out: str | Path, overwrite: bool = False) -> int:
    """Write the quantdeploy checkpoint ``source`` as a compressed-tensors folder ``out`` (atomically; a
    re-export is byte-identical). Returns the folder's size in bytes."""
    source, out = Path(source), Path(out)
    if not ckpt.is_checkpoint(source):
        raise CheckpointError(f"{source} is not a quantdeploy checkpoint; run quantize first, then export it")
    quant_config, _ = ckpt.read_checkpoint(source)
    model_config = json.loads((source / "config.json").read_text())
    check_exportable(quant_config)
    ckpt.check_output(out, overwrite, is_export, WHAT)
    tensors = ckpt.load_tensors(source)
    modules = quant_config.get("modules", {})
    exported: dict[str, torch.Tensor] = {}
    for name, spec_dict in modules.items():
        spec = QuantSpec.from_dict(spec_dict)
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        rows = local["qweight"].shape[0]
        cols = local["qweight"].shape[1] * (8 // spec.bits) if spec.dtype != "fp8_e4m3" else local["qweight"].shape[1]
        exported.update(module_tensors(name, spec, local, (rows, cols)))
        exported.update({f"{name}.bias": v for k, v in local.items() if k == "bias"})
    owned = tuple(n + "." for n in modules)
    exported.update({k: v for k, v in tensors.items() if not k.startswith(owned)})
    for k in [k for k in exported if k.endswith(KV_SCALES)]:  # [kv_heads] -> the attn_head shape [kv_heads, 1, 1]
        exported[k] = exported[k].float().reshape(-1, 1, 1)
    if "lm_head" in modules:  # a quantized head is not the embedding any more: a consumer must not tie them
        model_config["tie_word_embeddings"] = False
    if not model_config.get("tie_word_embeddings", False):  # aliases are tied weights stored once by us
        exported.update({a: tensors[k].clone() for a, k in quant_config.get("aliases", {}).items()})
    model_config["quantization_config"] = quantization_config(quant_config, list(quant_config.get("ignore", [])))

    return ckpt.write_folder(out, lambda folder: write_hf_folder(source, folder, model_config, exported), overwrite,
                             is_export, WHAT)


def write_hf_folder(source: Path, folder: Path, model_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    extra: dict[str, dict[str, Any]] | None = None) -> None:
    """What a transformers-style loader reads, into ``folder``: the tokenizer and generation files of
    ``source`` copied, ``config.json`` (and any ``extra`` JSON files by name), and ``model.safetensors``
    with the tensors in name order (so that a re-export is byte-identical)."""
    from safetensors.torch import save_file

    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    for name, content in {"config.json": model_config, **(extra or {})}.items():
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of the folder's config.json, or None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("quantization_config", {}).get("quant_method") if isinstance(config, dict) else None


WHAT = "compressed-tensors export (a config.json whose quantization_config is compressed-tensors')"


def is_export(path: Path) -> bool:
    """A folder this exporter wrote (what ``--overwrite`` may replace)."""
    return quant_method(path) == FORMAT
