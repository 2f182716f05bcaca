"""The GPTQ and AWQ layouts: every exported module decodes, under each layout's stated semantics, to the
weight our checkpoint holds; re-exports are byte-identical; what a layout cannot hold is refused with one
line before anything is written.

The decoders follow the readers: GPTQ (v1 checkpoint format) unpacks ``qweight [K/p, N]`` along the input
axis, adds 1 to the zero points it unpacks from ``qzeros [groups, N/p]`` and takes each input's group from
``g_idx``; AWQ unpacks ``qweight [K, N/8]`` and ``qzeros`` along the output axis and undoes its column order
(vLLM's ``_REVERSE_AWQ_PACK_ORDER`` = [0, 4, 1, 5, 2, 6, 3, 7]). ``w = (q - z) * s``. That vLLM's CPU build
loads both and generates our tokens is shown by ``benchmarks/export_check.py --vllm --formats gptq awq``.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import quantdeploy as qd
from quantdeploy.errors import CheckpointError
from quantdeploy.quant.primitives import dequantize_weight

REVERSE_AWQ = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``32 // bits`` codes per int32 along ``dim`` (0 or 1), the first in the low bits."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        return ((w.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)).reshape(-1, words.shape[1])
    return ((w.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)


def decode(t: dict[str, torch.Tensor], name: str, qc: dict) -> torch.Tensor:
    """The ``[N, K]`` weight a GPTQ / AWQ reader makes of module ``name`` (fp32)."""
    bits, scales = qc["bits"], t[f"{name}.scales"].float()  # [groups, N]
    if qc["quant_method"] == "gptq":
        q = unpack(t[f"{name}.qweight"], bits, 0)  # [K, N]
        z = unpack(t[f"{name}.qzeros"], bits, 1) + 1  # [groups, N]
        g = t[f"{name}.g_idx"].long()
        return ((q - z[g]) * scales[g]).T
    q = unpack(t[f"{name}.qweight"], 4, 1)  # [K, N], AWQ's column order
    q = q.view(q.shape[0], -1, 8)[:, :, REVERSE_AWQ].reshape(q.shape[0], -1)
    z = unpack(t[f"{name}.qzeros"], 4, 1)
    z = z.view(z.shape[0], -1, 8)[:, :, REVERSE_AWQ].reshape(z.shape[0], -1)
    g = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
    return ((q - z[g]) * scales[g]).T


CASES = {"gptq-int4-g32": ("gptq", qd.RTNConfig(bits=4, group_size=32)),
         "gptq-int8-channel": ("gptq", qd.RTNConfig(bits=8)),
         "awq-int4-asym-g32": ("awq", qd.RTNConfig(bits=4, group_size=32, symmetric=False)),
         "awq-int4-sym-g64": ("awq", qd.RTNConfig(bits=4, group_size=64))}


@pytest.mark.parametrize("case", CASES)
def test_every_exported_module_decodes_to_our_weight(tiny_bundle, tmp_path, case):
    layout, config = CASES[case]
    q = qd.quantize(tiny_bundle, config)
    qd.save(q, tmp_path / "q")
    qd.export(tmp_path / "q", tmp_path / "out", format=layout)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == layout and qc["bits"] == config.bits
    if layout == "gptq":
        assert qc["sym"] and not qc["desc_act"]
        assert json.loads((tmp_path / "out" / "quantize_config.json").read_text()) == qc
    t = load_file(tmp_path / "out" / "model.safetensors")
    modules = q.quant_config["modules"]
    assert modules
    for name, module in q.model.named_modules():
        if name in modules:
            assert t[f"{name}.qweight"].dtype == torch.int32
            assert torch.equal(decode(t, name, qc), dequantize_weight(module.quantized_weight())), name
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_reexport_is_byte_identical_and_overwrite_only_replaces_an_export(tiny_bundle, tmp_path):
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32)), tmp_path / "q")
    for name in ("a", "b"):
        qd.export(tmp_path / "q", tmp_path / name, format="awq")
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(CheckpointError, match="already exists"):
        qd.export(tmp_path / "q", tmp_path / "a", format="gptq")
    qd.export(tmp_path / "q", tmp_path / "a", format="gptq", overwrite=True)  # an export of ours: replaced
    with pytest.raises(CheckpointError, match="not a GPTQ/AWQ export"):
        qd.export(tmp_path / "q", tmp_path / "q", format="gptq", overwrite=True)


@pytest.mark.parametrize("layout,config,match", [
    ("gptq", qd.RTNConfig(bits=4, group_size=32, symmetric=False), "symmetric only"),
    ("awq", qd.RTNConfig(bits=8), "4-bit codes"),
    ("gptq", qd.NF4Config(group_size=32), "int4/int8 weight-only"),
    ("awq", qd.FP8Config(activations=True), "int4/int8 weight-only"),
    ("gptq", qd.RTNConfig(bits=4, group_size=32, targets=qd.TargetConfig(lm_head=True)), "head"),
])
def test_what_a_layout_cannot_hold_is_refused_before_writing(tiny_bundle, tmp_path, layout, config, match):
    qd.save(qd.quantize(tiny_bundle, config), tmp_path / "q")
    with pytest.raises(CheckpointError, match=match) as err:
        qd.export(tmp_path / "q", tmp_path / "out", format=layout)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["q"]


def test_mixed_specs_and_kv_caches_are_refused(tiny_bundle, tmp_path, data):
    calib = qd.CalibrationConfig(str(data / "text" / "wiki_en.train.txt"), 2, 32)
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32), kv_cache=qd.KVCacheConfig(
        dtype="int8", calibration=calib)), tmp_path / "kv")
    with pytest.raises(CheckpointError, match="KV-cache"):
        qd.export(tmp_path / "kv", tmp_path / "out", format="awq")
    from quantdeploy.formats.legacy_export import check_exportable

    a = {"dtype": "int4", "group_size": 32, "symmetric": True}
    b = {**a, "group_size": 64}
    with pytest.raises(CheckpointError, match="one spec for all layers"):
        check_exportable({"modules": {"l.0.q_proj": a, "l.1.q_proj": b}, "ignore": ["lm_head"]}, "gptq")
    with pytest.raises(CheckpointError, match="is unquantized"):
        check_exportable({"modules": {"l.0.q_proj": a}, "ignore": ["l.1.q_proj", "lm_head"]}, "gptq")
