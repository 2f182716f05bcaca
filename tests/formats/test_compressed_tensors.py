"""The compressed-tensors exporter: every exported module decodes, under compressed-tensors' stated
semantics, to the weight our checkpoint holds; re-exports are byte-identical; what the format cannot
hold is refused with one line before anything is written.

The decoder below follows compressed-tensors 0.17's definitions (``pack_to_int32``: values offset by
``2^(b-1)``, ``32 // b`` per int32 along the last axis, the first in the low bits; zero points packed
along the rows; ``w = (q - zp) * scale``). That the real library and transformers load the folder and
give our logits is shown by ``benchmarks/export_check.py`` in an environment of their own (the consumer
is not a dependency of ours).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import quantdeploy as qd
from quantdeploy.errors import CheckpointError, ConfigError
from quantdeploy.formats import compressed_tensors as ct
from quantdeploy.quant.primitives import dequantize_weight

CONFIGS = {
    "int4-sym-g32": qd.RTNConfig(bits=4, group_size=32),
    "int4-asym-g32": qd.RTNConfig(bits=4, group_size=32, symmetric=False),
    "int8-asym-channel": qd.RTNConfig(bits=8, group_size=None, symmetric=False),
    "fp8-w8a8": qd.FP8Config(activations=True),
    "int4-head": qd.RTNConfig(bits=4, group_size=32, targets=qd.TargetConfig(lm_head=True)),
}


def unpack_rows(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """compressed-tensors' unpacking of values packed along dim 0 (offset not removed)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    vals = (words.to(torch.int64).unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
    return vals.reshape(-1, words.shape[1])[:rows]


def decode(t: dict[str, torch.Tensor], name: str, group: dict) -> torch.Tensor:
    """The weight a compressed-tensors consumer makes of module ``name`` (fp32)."""
    w_args = group["weights"]
    scale = t[f"{name}.weight_scale"].float()
    if group["format"] == "pack-quantized":
        bits = w_args["num_bits"]
        out, cols = t[f"{name}.weight_shape"].tolist()
        q = unpack_rows(t[f"{name}.weight_packed"].T.contiguous(), bits, cols).T - 2 ** (bits - 1)
        zp = 0 if w_args["symmetric"] else unpack_rows(t[f"{name}.weight_zero_point"], bits, out) - 2 ** (bits - 1)
    else:  # int-quantized / float-quantized: the values as stored
        q, zp = t[f"{name}.weight"].float(), 0
    groups = scale.shape[1]
    w = (q.float().view(q.shape[0], groups, -1) - (zp.float().unsqueeze(-1) if torch.is_tensor(zp) else 0))
    return (w * scale.unsqueeze(-1)).view(q.shape[0], -1)


@pytest.fixture(scope="module")
def saved(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, config in CONFIGS.items():
        q = qd.quantize(tiny_bundle, config)
        qd.save(q, root / name)
        out[name] = (q, root / name)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_every_exported_module_decodes_to_our_weight(saved, tmp_path, name):
    q, path = saved[name]
    qd.export(path, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    t = load_file(tmp_path / "ct" / "model.safetensors")
    modules = q.quant_config["modules"]
    targeted = {n: g for g in qc["config_groups"].values() for n in g["targets"]}
    assert set(targeted) == set(modules)
    assert qc["ignore"] == sorted(q.quant_config["ignore"])
    for module_name, qlinear in q.model.named_modules():
        if module_name in modules:
            assert torch.equal(decode(t, module_name, targeted[module_name]), dequantize_weight(qlinear.quantized_weight()))
    if name == "int4-head":  # a quantized head is no longer the embedding: untied, both stored
        assert config["tie_word_embeddings"] is False and "model.embed_tokens.weight" in t
    if name == "fp8-w8a8":
        acts = next(iter(qc["config_groups"].values()))["input_activations"]
        assert acts["type"] == "float" and acts["dynamic"] and acts["strategy"] == "token"


def test_smoothquant_exports_int8_weights_and_dynamic_int8_activations(tiny_bundle, tmp_path, data):
    calib = qd.CalibrationConfig(str(data / "text" / "wiki_en.train.txt"), 4, 64)
    q = qd.quantize(tiny_bundle, qd.SmoothQuantConfig(calibration=calib))
    qd.save(q, tmp_path / "sq")
    qd.export(tmp_path / "sq", tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    assert qc["format"] == "int-quantized" and group["input_activations"]["type"] == "int"
    t = load_file(tmp_path / "ct" / "model.safetensors")
    for module_name, module in q.model.named_modules():
        if module_name in q.quant_config["modules"]:
            assert t[f"{module_name}.weight"].dtype == torch.int8
            assert torch.equal(decode(t, module_name, group), dequantize_weight(module.quantized_weight()))


def test_reexport_is_byte_identical_and_overwrite_only_replaces_an_export(saved, tmp_path):
    _, path = saved["int4-asym-g32"]
    qd.export(path, tmp_path / "a")
    qd.export(path, tmp_path / "b")
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(CheckpointError, match="already exists"):
        qd.export(path, tmp_path / "a")
    qd.export(path, tmp_path / "a", overwrite=True)
    with pytest.raises(CheckpointError, match="not a compressed-tensors export"):
        qd.export(path, path, overwrite=True)  # never replaces the source checkpoint
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_what_the_format_cannot_hold_is_refused_before_writing(tiny_bundle, tmp_path, data):
    q = qd.quantize(tiny_bundle, qd.NF4Config(group_size=32))
    qd.save(q, tmp_path / "nf4")
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\..*nf4.*no NF4 type"):
        qd.export(tmp_path / "nf4", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    kv = qd.quantize_kv_cache(qd.quantize(tiny_bundle, qd.RTNConfig(bits=8)), qd.KVCacheConfig(
        dtype="int8", calibration=qd.CalibrationConfig(str(data / "text" / "wiki_en.train.txt"), 4, 64)))
    qd.save(kv, tmp_path / "kv")
    with pytest.raises(CheckpointError, match="KV cache is int4, which compressed-tensors does not hold"):
        ct.check_exportable({"kv_cache": {"dtype": "int4"}})
    with pytest.raises(CheckpointError, match="not a quantdeploy checkpoint"):
        qd.export(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown export format 'onnx'; available: compressed-tensors, gguf"):
        qd.export(tmp_path / "kv", tmp_path / "out", format="onnx")
    with pytest.raises(ConfigError, match="--requantize applies to the gguf export"):
        qd.export(tmp_path / "kv", tmp_path / "out", requantize=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_kv_cache_scales_export_per_head_with_their_scheme(tiny_bundle, tmp_path, data, kv_dtype):
    calib = qd.CalibrationConfig(str(data / "text" / "wiki_en.train.txt"), 4, 64)
    q = qd.quantize_kv_cache(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32)),
                             qd.KVCacheConfig(dtype=kv_dtype, calibration=calib))
    qd.save(q, tmp_path / "kv")
    qd.export(tmp_path / "kv", tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = qc["kv_cache_scheme"]
    assert scheme["strategy"] == "attn_head" and scheme["num_bits"] == 8 and scheme["symmetric"]
    assert scheme["type"] == ("int" if kv_dtype == "int8" else "float") and not scheme["dynamic"]
    t = load_file(tmp_path / "ct" / "model.safetensors")
    heads = tiny_bundle.model.config.num_key_value_heads
    for i, layer in enumerate(q.model.model.layers):
        for kind in ("k", "v"):
            exported = t[f"model.layers.{i}.self_attn.{kind}_scale"]
            assert exported.shape == (heads, 1, 1) and exported.dtype == torch.float32
            assert torch.equal(exported.flatten(), getattr(layer.self_attn, f"{kind}_scale").float().cpu())


def test_different_specs_become_config_groups():
    spec = {"type": "quant_spec", "version": 1, "dtype": "int4", "group_size": 32, "symmetric": True,
            "double_quant": False, "activations": None}
    fp8 = {**spec, "dtype": "fp8_e4m3", "group_size": None, "activations": "fp8_e4m3"}
    qc = ct.quantization_config({"modules": {"a.q": spec, "a.k": spec, "a.up": fp8}}, ["lm_head"])
    groups = sorted(qc["config_groups"].values(), key=lambda g: g["format"])
    assert qc["format"] == "mixed-precision"
    assert [(g["format"], g["targets"]) for g in groups] == [("float-quantized", ["a.up"]),
                                                              ("pack-quantized", ["a.k", "a.q"])]


def test_zero_points_pack_along_rows_as_compressed_tensors_does():
    codes = torch.randint(0, 16, (13, 3))  # 13 rows: the last word is padded with zeros
    words = ct.pack_along_rows(codes, 4)
    assert words.shape == (2, 3) and words.dtype == torch.int32
    assert torch.equal(unpack_rows(words, 4, 13), codes)
    assert ct.pack_along_rows(torch.full((8, 1), 15), 4).item() == -1  # all nibbles set: the sign bit too


def test_cli_export(saved, tmp_path, capsys):
    from quantdeploy.cli import main

    _, path = saved["int4-sym-g32"]
    assert main(["export", str(path), "-o", str(tmp_path / "ct")]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert main(["export", str(path), "-o", str(tmp_path / "ct")]) == 2  # a user error: one line, exit 2
