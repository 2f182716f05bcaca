"""Export a quantdeploy checkpoint as one GGUF file: what llama.cpp loads (and with it llama-cpp-python,
Ollama and LM Studio; transformers reads it with ``gguf_file=``).

What it owns: which GGUF type holds each of our specs exactly, the tensor names and row order llama.cpp's
Llama graph expects, and the metadata and tokenizer it needs. A spec no GGUF type holds exactly is refused
with one line naming the module and its spec, before anything is written; ``requantize=True`` converts
those to the nearest type instead (the caller measures what that costs: ``cli_deploy``).

Exact mappings. A GGUF block is 32 weights of one row with one fp16 scale; our integer scales are fp16,
and a group of ``32·n`` weights (or a whole row, per channel) repeats its scale in each of its n blocks:

- int8 symmetric (RTN/GPTQ/AWQ, and SmoothQuant's W8A8 weights): Q8_0, ``qs = c - 128``, ``d = s``:
  llama.cpp's ``d·qs`` is our ``s·(c - 128)`` bit for bit.
- int4 symmetric: Q4_0, ``q = c``, ``d = s``: llama.cpp's ``d·(q - 8)`` is our ``s·(c - 8)``.
- int4 asymmetric: Q4_1, ``q = c``, ``d = s``, ``m = -s·z`` rounded to fp16 (llama.cpp: ``d·q + m``), the
  zero point an integer code or a real number (``halfquad``'s fp16 zeros: Q4_1's own form).
  That rounding is the one inexact step: it moves a group's weights by at most ``2^-11·|s·z|``;
  :func:`export` logs the largest move.
- unquantized tensors as stored (F32, F16, BF16); 1-D tensors (norms, biases) as F32.

Not carried: activation quantization (llama.cpp quantizes a matmul's input its own way for these types,
8-bit blocks of 32, so SmoothQuant's per-token int8 inputs are not reproduced; its smoothing is already
folded into the norms); KV-cache scales (llama.cpp chooses ``--cache-type-k/-v`` at run time: refused).
With ``requantize``: other 8-bit specs (int8 asymmetric, FP8) become Q8_0, other specs of at most 4 bits
(int3, int2, NF4, groups that are not 32·n) Q4_0 if symmetric else Q4_1, each by rounding our
dequantized weight onto that type's grid with our own RTN (:func:`round_onto`).

Rows: transformers' Llama rotates the two halves of each head, llama.cpp's rotates adjacent pairs, so the
rows of q_proj and k_proj are permuted within each head (llama.cpp's converter does the same and
transformers undoes it on load); the codes, scales and zeros of a row move together.
Tokenizer: byte-level BPE from ``tokenizer.json`` (tokens, their types, merges, special ids and chat
template through gguf's ``SpecialVocab``); llama.cpp names its pre-tokenizer, which is read from the
tokenizer's own (``gguf_vocab.py``); one it has no name for is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantdeploy.errors import CheckpointError
from quantdeploy.formats import checkpoint as ckpt
from quantdeploy.formats.gguf_vocab import pre_tokenizer, vocabulary
from quantdeploy.quant.packing import unpack_bits
from quantdeploy.quant.primitives import QuantizedWeight, dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

log = logging.getLogger(__name__)

FILE = "model.gguf"
BLOCK = 32



def _gguf():  # noqa: ANN202 - the gguf module, or one line saying how to get it
    try:
        import gguf
    except ImportError:
        raise CheckpointError("exporting GGUF needs the 'gguf' package; run: pip install gguf") from None
    return gguf


def exact_type(spec: QuantSpec, in_features: int) -> str | None:
    """The GGUF type that holds ``spec`` exactly on rows of ``in_features`` weights, or None."""
    group = spec.group_for(in_features)
    if spec.dtype not in ("int4", "int8") or group % BLOCK or in_features % BLOCK:
        return None
    if spec.dtype == "int8":
        return "Q8_0" if spec.symmetric else None
    return "Q4_0" if spec.symmetric else "Q4_1"


def nearest_type(spec: QuantSpec) -> str:
    """The type ``requantize`` converts a spec to: the smallest that has at least its bits."""
    if spec.bits == 8:
        return "Q8_0"
    return "Q4_0" if spec.symmetric else "Q4_1"


def plan(quant_config: dict[str, Any], shapes: dict[str, tuple[int, int]], requantize: bool) -> dict[str, tuple[str, bool]]:
    """``module -> (GGUF type, exact)`` for every quantized module; raises CheckpointError (one line: the
    module, its spec and what to do) for the first one no type holds, unless ``requantize``."""
    if quant_config.get("kv_cache"):
        raise CheckpointError("the checkpoint has KV-cache scales, which GGUF does not hold (llama.cpp picks "
                              "--cache-type-k/-v at run time); export a checkpoint quantized without --kv-cache")
    out = {}
    for name, spec_dict in sorted(quant_config.get("modules", {}).items()):
        spec = QuantSpec.from_dict(spec_dict)
        kind = exact_type(spec, shapes[name][1])
        if kind is None and shapes[name][1] % BLOCK:
            raise CheckpointError(f"{name} has {shapes[name][1]} inputs, not a multiple of GGUF's blocks of {BLOCK}: "
                                  "not exportable to GGUF")
        if kind is None and not requantize:
            raise CheckpointError(f"{name} is {spec.describe()}, which no GGUF type holds exactly (Q8_0: int8 sym, "
                                  "Q4_0/Q4_1: int4 sym/asym, groups of 32·n); pass --requantize to convert it to "
                                  f"{nearest_type(spec)} and measure what that costs")
        out[name] = (kind or nearest_type(spec), kind is not None)
    return out


def _per_block(values: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> np.ndarray:
    """Per-group ``[rows, groups]`` values repeated for each block of 32: ``[rows, in / 32, 1]``."""
    repeat = spec.group_for(shape[1]) // BLOCK
    return values.repeat_interleave(repeat, dim=1).unsqueeze(-1).numpy()


def exact_blocks(kind: str, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The GGUF blocks ``uint8 [rows, bytes]`` of a module held exactly, and the largest weight move
    (non-zero for Q4_1's fp16 offsets only)."""
    rows, cols = shape
    codes = unpack_bits(t["qweight"], spec.bits, cols).numpy().reshape(rows, cols // BLOCK, BLOCK)
    d = _per_block(t["scales"].to(torch.float16), shape, spec).view(np.uint8)  # [rows, blocks, 2]
    if kind == "Q8_0":
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(rows, -1), 0.0
    qs = codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)
    if kind == "Q4_0":
        return np.concatenate([d, qs], axis=-1).reshape(rows, -1), 0.0
    offset = -(t["scales"].float() * t["zeros"].float())  # exact in fp32: two fp16 values (or a 4-bit zero)
    m = offset.to(torch.float16)
    move = float((m.float() - offset).abs().max()) if m.numel() else 0.0
    m_blocks = _per_block(m, shape, spec).view(np.uint8)
    return np.concatenate([d, m_blocks, qs], axis=-1).reshape(rows, -1), move


def round_onto(kind: str, weight: torch.Tensor) -> tuple[QuantSpec, dict[str, torch.Tensor]]:
    """``weight [rows, in]`` rounded onto ``kind``'s grid by our own RTN (all 2^b codes, and the clip
    search below 8 bits): the spec and tensors that ``kind`` then holds exactly. Measured on the bundled
    model's NF4 g64 layers, this costs a KLD of 0.46 against the NF4 model where the gguf package's
    reference Q4_0 quantizer (scale = the largest weight / -8, so the opposite extreme is clipped by a
    step) costs 1.54."""
    spec = QuantSpec(dtype="int8" if kind == "Q8_0" else "int4", group_size=BLOCK, symmetric=kind != "Q4_1")
    return spec, quantize_weight(weight, spec, clip_search=spec.bits < 8).tensors


def permute_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (``[heads·head_dim, ...]``) from halves-rotated to pairs-rotated order per head."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_heads`: llama.cpp's row order of q/k back to transformers'."""
    rows = t.shape[0]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def module_shape(spec: QuantSpec, t: dict[str, torch.Tensor]) -> tuple[int, int]:
    rows, width = t["qweight"].shape
    return rows, width if spec.dtype == "fp8_e4m3" else width * 8 // spec.bits


def _hparams(writer, config: dict[str, Any]) -> None:
    """Llama hyper-parameters, RoPE included (default, linear and llama3 scaling; others refused)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(params.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope_kind(config) == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def rope_kind(config: dict[str, Any]) -> str:
    """The config's RoPE scaling type; CheckpointError for one this export does not write."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"RoPE scaling '{kind}' has no GGUF export here (default, linear and llama3 do)")
    return kind


def _rope_freqs(config: dict[str, Any]) -> np.ndarray | None:
    """llama3 scaling: the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``."""
    if rope_kind(config) != "llama3":
        return None
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama, "cpu")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return (base / scaled.float()).numpy()


def _tensor_array(t: torch.Tensor) -> tuple[np.ndarray, Any]:
    """An unquantized tensor as stored: (array, raw GGUF type or None); 1-D tensors widened to F32."""
    gguf = _gguf()
    if t.dim() == 1 or t.dtype not in (torch.float16, torch.bfloat16):
        return t.float().contiguous().numpy(), None
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    return t.contiguous().numpy(), None


def _file_type(kinds: list[str], float_dtype: torch.dtype) -> int:
    gguf = _gguf()
    if kinds:
        return int(gguf.LlamaFileType[f"MOSTLY_{max(set(kinds), key=kinds.count)}"])
    return int({torch.float16: gguf.LlamaFileType.MOSTLY_F16, torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}.get(
        float_dtype, gguf.LlamaFileType.ALL_F32))


def export(source: str | Path, out: str | Path, overwrite: bool = False, requantize: bool = False) -> int:
    """Write the quantdeploy checkpoint ``source`` as ``out/model.gguf`` (atomically: the folder appears
    complete or not at all; a re-export is byte-identical). Returns the folder's size in bytes."""
    gguf = _gguf()
    source, out = Path(source), Path(out)
    if not ckpt.is_checkpoint(source):
        raise CheckpointError(f"{source} is not a quantdeploy checkpoint; run quantize first, then export it")
    quant_config, _ = ckpt.read_checkpoint(source)
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise CheckpointError(f"the GGUF export writes Llama models; this one is '{config.get('model_type')}'")
    rope_kind(config)
    if not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"{source} has no tokenizer.json, which the GGUF export embeds")
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    pre = pre_tokenizer(tokenizer_json)
    tokens, token_types = vocabulary(tokenizer_json, config["vocab_size"])
    tensors = ckpt.load_tensors(source)
    modules = {n: QuantSpec.from_dict(s) for n, s in quant_config.get("modules", {}).items()}
    local = {n: {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")} for n in modules}
    types = plan(quant_config, {n: module_shape(s, local[n]) for n, s in modules.items()}, requantize)
    ckpt.check_output(out, overwrite, is_export, WHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}

    def gguf_name(hf: str) -> str:
        stem, _, suffix = hf.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise CheckpointError(f"{hf} has no place in llama.cpp's Llama graph: not exportable to GGUF")
        return f"{name}.{suffix}"

    def rows_in_llama_order(hf_module: str, t: torch.Tensor) -> torch.Tensor:
        leaf = hf_module.rsplit(".", 1)[-1]
        return permute_heads(t, heads[leaf]) if leaf in heads else t

    arrays: dict[str, tuple[np.ndarray, Any]] = {}
    moves, requantized = [], []
    for name, spec in sorted(modules.items()):
        kind, exact = types[name]
        t = {k: v for k, v in local[name].items() if k != "bias"}
        shape = module_shape(spec, t)
        if exact:  # every stored tensor of an integer spec has one row per output channel
            blocks, move = exact_blocks(kind, {k: rows_in_llama_order(name, v) for k, v in t.items()}, spec, shape)
            moves.append(move)
        else:
            weight = rows_in_llama_order(name, dequantize_weight(QuantizedWeight(spec, shape, t)))
            target, rounded = round_onto(kind, weight)
            blocks, _ = exact_blocks(kind, rounded, target, shape)
            requantized.append(f"{name}: {spec.describe()} -> {kind}")
        arrays[gguf_name(name + ".weight")] = (blocks, gguf.GGMLQuantizationType[kind])
        if "bias" in local[name]:
            arrays[gguf_name(name + ".bias")] = _tensor_array(rows_in_llama_order(name, local[name]["bias"]))
    owned = tuple(n + "." for n in modules)
    float_dtype = torch.float32
    for key, value in sorted(tensors.items()):
        if not key.startswith(owned):
            arrays[gguf_name(key)] = _tensor_array(rows_in_llama_order(key.rsplit(".", 1)[0], value))
            float_dtype = value.dtype if value.dim() == 2 else float_dtype
    if "lm_head" in modules or not config.get("tie_word_embeddings", False):
        for alias, target in quant_config.get("aliases", {}).items():  # a tied head stored once by us
            arrays.setdefault(gguf_name(alias), _tensor_array(tensors[target]))
    if (freqs := _rope_freqs(config)) is not None:
        arrays["rope_freqs.weight"] = (freqs.astype(np.float32), None)
    if requantized:
        kinds = sorted({entry.split(": ", 1)[1] for entry in requantized})
        log.warning("requantized %d modules (%s)", len(requantized), ", ".join(kinds))
    if moves and max(moves) > 0:
        log.info("Q4_1 offsets rounded to fp16: largest weight move %.3g", max(moves))

    def write(folder: Path) -> None:
        writer = gguf.GGUFWriter(folder / FILE, "llama")
        writer.add_name(config.get("_name_or_path") or source.name)
        _hparams(writer, config)
        writer.add_file_type(_file_type([k for k, _ in types.values()], float_dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        gguf.SpecialVocab(source, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        writer.add_string(PRODUCER_KEY, "quantdeploy")
        writer.add_string(REQUANTIZED_KEY, "; ".join(requantized))
        for key, (array, raw) in arrays.items():
            writer.add_tensor(key, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return ckpt.write_folder(out, write, overwrite, is_export, WHAT)


def requantized_modules(gguf_file: Path) -> list[str]:
    """Names of the modules an export converted (``requantize``), as recorded in the file."""
    field = _gguf().GGUFReader(gguf_file).fields.get(REQUANTIZED_KEY)
    text = field.contents() if field is not None else ""
    return [entry.split(":", 1)[0] for entry in text.split("; ") if entry]


def with_gguf_weights(model: torch.nn.Module, config: dict[str, Any], gguf_file: Path, names: list[str]) -> torch.nn.Module:
    """``model`` (ours, loaded from the checkpoint) with the modules ``names`` replaced by plain Linear
    layers holding the weights ``gguf_file`` stores for them, dequantized by the gguf package: the model
    a consumer of the file computes, for measuring what a requantization costs."""
    gguf = _gguf()
    reader = gguf.GGUFReader(gguf_file)
    stored = {t.name: t for t in reader.tensors}
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    for name in names:
        t = stored[f"{mapping.get_name(name)}.weight"]
        weight = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        leaf = name.rsplit(".", 1)[-1]
        weight = unpermute_heads(weight, heads[leaf]) if leaf in heads else weight
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        model.set_submodule(name, linear.requires_grad_(False))
    return model


REQUANTIZED_KEY = "quantdeploy.requantized"
PRODUCER_KEY = "quantdeploy.producer"
WHAT = "GGUF export (a folder holding model.gguf written by quantdeploy)"


def is_export(path: Path) -> bool:
    """A folder this exporter wrote (what ``--overwrite`` may replace)."""
    file = Path(path) / FILE
    if not file.is_file():
        return False
    try:
        reader = _gguf().GGUFReader(file)
    except (ValueError, OSError):
        return False
    field = reader.fields.get(PRODUCER_KEY)
    return field is not None and field.contents() == "quantdeploy"
