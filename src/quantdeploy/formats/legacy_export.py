"""Export a quantdeploy checkpoint in the GPTQ or AWQ layout: the ``qweight`` / ``qzeros`` / ``scales``
(/ ``g_idx``) tensors AutoGPTQ, GPTQModel and AutoAWQ wrote, for tools that still expect them (vLLM reads
both as ``quant_method`` "gptq" / "awq"). compressed-tensors is the better target where the consumer reads
it (``compressed_tensors.py``): it holds every spec these two hold and more.

What it owns: the two layouts, and refusing with one line, before anything is written, what they cannot
hold exactly. Both hold one spec for every quantized Linear (their config has one ``bits`` and one
``group_size``), with only the output head left unquantized; neither holds activations or a KV cache.

- **GPTQ** (``checkpoint_format`` "gptq", static groups, ``desc_act`` false): ``qweight`` int32
  ``[K / p, N]`` packs ``p = 32 / bits`` codes along the input axis, the first in the low bits: our
  ``qweight`` viewed as int32 words, transposed. ``scales`` fp16 ``[groups, N]``; ``g_idx`` int32 ``[K]``
  = ``k // group`` (GPTQ's act-order with static groups keeps contiguous groups, so this holds it too);
  ``qzeros`` int32 ``[groups, N / p]`` packs ``z - 1`` along the output axis (the v1 format's offset,
  which its readers add back). Symmetric int4/int8 only: vLLM's GPTQ reader refuses asymmetric ones
  (``(4, False)`` is not among its types), and nothing here could check them.
- **AWQ** (``version`` "gemm", ``zero_point`` true): ``qweight`` int32 ``[K, N / 8]`` packs eight codes
  along the output axis in AWQ's order (bits ``4i`` hold column ``8j + [0, 2, 4, 6, 1, 3, 5, 7][i]``),
  ``qzeros`` the zero points the same way (no offset), ``scales`` fp16 ``[groups, N]``. int4 only,
  symmetric or not: a symmetric spec is written with its zero point 8 in ``qzeros``.

Our codes, scales and zeros move bit for bit: ``(c - z) * s`` is what both layouts' readers compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantdeploy.errors import CheckpointError
from quantdeploy.formats import checkpoint as ckpt
from quantdeploy.formats.compressed_tensors import pack_along_rows, quant_method, write_hf_folder
from quantdeploy.quant.packing import unpack_bits
from quantdeploy.quant.spec import QuantSpec

LAYOUTS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # bits 4i of an AWQ word hold column 8j + AWQ_ORDER[i]


def check_exportable(quant_config: dict[str, Any], layout: str) -> QuantSpec:
    """The one spec every quantized module shares, or CheckpointError (one line: the module and what to
    do) for the first thing ``layout`` cannot hold exactly. Cheap: runs before anything is read."""
    modules = quant_config.get("modules", {})
    if not modules:
        raise CheckpointError(f"the checkpoint has no quantized Linear layers; the {layout} layout holds "
                              "quantized ones")
    if quant_config.get("kv_cache"):
        raise CheckpointError(f"the {layout} layout holds no KV-cache scales; export to compressed-tensors, or "
                              "quantize without --kv-cache")
    unquantized = [n for n in quant_config.get("ignore", []) if n.rsplit(".", 1)[-1] != "lm_head"]
    if unquantized:
        raise CheckpointError(f"{unquantized[0]} is unquantized, and the {layout} layout quantizes every Linear but "
                              "the head; export to compressed-tensors (it keeps an ignore list)")
    first = None
    for name, spec_dict in sorted(modules.items()):
        spec = QuantSpec.from_dict(spec_dict)
        if name.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens"):
            raise CheckpointError(f"{name} is quantized ({spec.describe()}); the {layout} layout keeps the head and "
                                  "embeddings unquantized: quantize without --lm-head/--embeddings to export")
        if spec.activations is not None or spec.dtype not in ("int4", "int8"):
            raise CheckpointError(f"{name} is {spec.describe()}: the {layout} layout holds int4/int8 weight-only "
                                  "layers; export to compressed-tensors")
        if spec.float_zeros:
            raise CheckpointError(f"{name} is {spec.describe()}: the {layout} layout stores integer zero points; "
                                  "export to gguf (Q4_1 holds real zero points) or quantize with rtn/gptq/awq --asym")
        if layout == "awq" and spec.bits != 4:
            raise CheckpointError(f"{name} is {spec.describe()}: the awq layout holds 4-bit codes; use --format gptq "
                                  "or compressed-tensors")
        if layout == "gptq" and not spec.symmetric:
            raise CheckpointError(f"{name} is {spec.describe()}: vLLM reads GPTQ checkpoints symmetric only; use "
                                  "--format awq or compressed-tensors")
        if first is not None and spec != first[1]:
            raise CheckpointError(f"{name} is {spec.describe()} but {first[0]} is {first[1].describe()}: the "
                                  f"{layout} layout has one spec for all layers; export to compressed-tensors")
        first = first or (name, spec)
    return first[1]


def _pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes [rows, cols]`` packed ``32 // bits`` per int32 along the columns, first in the low bits."""
    return pack_along_rows(codes.T.contiguous(), bits).T.contiguous()


def _awq_words(codes: torch.Tensor) -> torch.Tensor:
    """int4 ``codes [rows, cols]`` packed eight per int32 along the columns in AWQ's order."""
    rows, cols = codes.shape
    return _pack_columns(codes.view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols), 4)


def module_tensors(name: str, spec: QuantSpec, t: dict[str, torch.Tensor], shape: tuple[int, int],
                   layout: str) -> dict[str, torch.Tensor]:
    """The ``layout`` tensors of one quantized Linear ``[N, K]``, from our canonical ones."""
    n, k = shape
    per = 32 // spec.bits
    group = spec.group_for(k)
    if k % per or n % per or k % group:
        raise CheckpointError(f"{name}: {n}x{k} is not a whole number of int32 words of {spec.bits}-bit codes along "
                              f"both axes; the {layout} layout would pad it: export to compressed-tensors")
    groups = k // group
    scales = t["scales"].to(torch.float16).T.contiguous()  # [groups, N]
    zeros = t["zeros"] if "zeros" in t else torch.full((n, groups), 2 ** (spec.bits - 1), dtype=torch.uint8)
    if layout == "gptq":
        return {f"{name}.qweight": t["qweight"].contiguous().view(torch.int32).T.contiguous(),
                f"{name}.qzeros": _pack_columns(zeros.T.to(torch.int64) - 1, spec.bits),
                f"{name}.scales": scales,
                f"{name}.g_idx": torch.arange(k, dtype=torch.int32) // group}
    codes = unpack_bits(t["qweight"], spec.bits, k)  # [N, K]
    return {f"{name}.qweight": _awq_words(codes.T.contiguous()), f"{name}.qzeros": _awq_words(zeros.T.contiguous()),
            f"{name}.scales": scales}


def layout_config(spec: QuantSpec, layout: str) -> dict[str, Any]:
    """The ``quantization_config`` of config.json (and, for GPTQ, quantize_config.json)."""
    group = -1 if spec.group_size is None else spec.group_size
    if layout == "gptq":
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": group, "desc_act": False, "sym": True,
                "lm_head": False, "checkpoint_format": "gptq", "true_sequential": True, "static_groups": True}
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def export(source: str | Path, out: str | Path, overwrite: bool = False, layout: str = "gptq") -> int:
    """Write the quantdeploy checkpoint ``source`` in the ``layout`` ("gptq" or "awq") to the folder ``out``
    (atomically; a re-export is byte-identical). Returns the folder's size in bytes."""
    source, out = Path(source), Path(out)
    if not ckpt.is_checkpoint(source):
        raise CheckpointError(f"{source} is not a quantdeploy checkpoint; run quantize first, then export it")
    quant_config, _ = ckpt.read_checkpoint(source)
    spec = check_exportable(quant_config, layout)
    ckpt.check_output(out, overwrite, is_export, WHAT)
    model_config = json.loads((source / "config.json").read_text())
    tensors = ckpt.load_tensors(source)
    modules = quant_config["modules"]
    exported: dict[str, torch.Tensor] = {}
    for name in modules:
        local = {key[len(name) + 1:]: v for key, v in tensors.items() if key.startswith(name + ".")}
        shape = (local["qweight"].shape[0], local["qweight"].shape[1] * 8 // spec.bits)
        exported.update(module_tensors(name, spec, local, shape, layout))
        exported.update({f"{name}.bias": v for key, v in local.items() if key == "bias"})
    owned = tuple(n + "." for n in modules)
    exported.update({key: v for key, v in tensors.items() if not key.startswith(owned)})
    if not model_config.get("tie_word_embeddings", False):  # aliases are tied weights stored once by us
        exported.update({a: tensors[key].clone() for a, key in quant_config.get("aliases", {}).items()})
    qconfig = layout_config(spec, layout)
    model_config["quantization_config"] = qconfig

    extra = {"quantize_config.json": qconfig} if layout == "gptq" else {}  # AutoGPTQ reads its settings there
    return ckpt.write_folder(out, lambda folder: write_hf_folder(source, folder, model_config, exported, extra),
                             overwrite, is_export, WHAT)


WHAT = "GPTQ/AWQ export (a config.json whose quantization_config is gptq's or awq's)"


def is_export(path: Path) -> bool:
    """A folder this exporter wrote (what ``--overwrite`` may replace)."""
    return quant_method(path) in LAYOUTS
