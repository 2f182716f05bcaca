"""The GGUF exporter: every exactly-held module decodes, by the gguf package's own dequantizers, to the
weight our checkpoint holds (bit for bit for Q4_0 and Q8_0, within the stated fp16 offset rounding for
Q4_1); transformers loads the file and computes our logits; what no GGUF type holds is refused with one
line before anything is written, or converted with ``requantize``; re-exports are byte-identical.

That llama.cpp itself loads the files, tokenizes like us and matches our KL divergence is shown by
``benchmarks/gguf_check.py`` (llama-cpp-python lives in an environment of its own).
"""

import json

import gguf
import pytest
import torch

import quantdeploy as qd
from quantdeploy.errors import CheckpointError
from quantdeploy.formats import gguf_export as ge
from quantdeploy.formats import gguf_vocab as gv
from quantdeploy.quant.primitives import dequantize_weight

CONFIGS = {
    "int4-sym-g32": (qd.RTNConfig(bits=4, group_size=32), "Q4_0"),
    "int4-asym-g64": (qd.RTNConfig(bits=4, group_size=64, symmetric=False), "Q4_1"),
    "int8-channel": (qd.RTNConfig(bits=8, group_size=None), "Q8_0"),
    "halfquad-g64": (qd.HalfQuadConfig(bits=4, group_size=64), "Q4_1"),  # real zero points: Q4_1's own d·q + m
    "int4-head": (qd.RTNConfig(bits=4, group_size=32, targets=qd.TargetConfig(lm_head=True)), "Q4_0"),
}
REFUSED = {
    "int3-g32": qd.RTNConfig(bits=3, group_size=32),
    "nf4-g32": qd.NF4Config(group_size=32),
    "fp8": qd.FP8Config(),
    "int8-asym": qd.RTNConfig(bits=8, symmetric=False),
}


@pytest.fixture(scope="module")
def saved(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, config in {**{k: c for k, (c, _) in CONFIGS.items()}, **REFUSED}.items():
        q = qd.quantize(tiny_bundle, config)
        qd.save(q, root / name)
        out[name] = (q, root / name)
    return out


def stored_weights(path, config) -> dict[str, tuple[str, torch.Tensor]]:
    """Each 2-D tensor of the file as the gguf package dequantizes it, rows back in transformers' order."""
    reader = gguf.GGUFReader(path)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        kind = t.name.split(".")[-2]
        out[t.name] = (t.tensor_type.name, ge.unpermute_heads(w, heads[kind]) if kind in heads else w)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_every_module_decodes_to_our_weight(saved, tmp_path, name):
    q, path = saved[name]
    qd.export(path, tmp_path / "gguf", "gguf")
    config = json.loads((path / "config.json").read_text())
    stored = stored_weights(tmp_path / "gguf" / ge.FILE, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected_type = CONFIGS[name][1]
    modules = q.quant_config["modules"]
    for module_name, module in q.model.named_modules():
        if module_name not in modules:
            continue
        kind, w = stored[f"{names.get_name(module_name)}.weight"]
        ours = dequantize_weight(module.quantized_weight())
        assert kind == expected_type
        if kind == "Q4_1":  # the offset -s·z rounded to fp16: at most half an fp16 ulp of |s·z|
            t = module.quantized_weight().tensors
            bound = (t["scales"].float() * t["zeros"].float()).abs().max() * 2.0**-11
            assert 0 < (w - ours).abs().max() <= bound
        else:
            assert torch.equal(w, ours), module_name
    assert ("output.weight" in stored) == ("lm_head" in modules)  # a tied, unquantized head is the embedding


def test_transformers_loads_the_file_and_computes_our_logits(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTDEPLOY_CACHE", str(tmp_path / "cache"))
    q, path = saved["int4-head"]
    qd.export(path, tmp_path / "gguf", "gguf")
    theirs = qd.load_model(tmp_path / "gguf" / ge.FILE)  # transformers' GGUF loader, dequantized
    ids = torch.randint(3, theirs.model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(theirs.model(ids).logits, qd.load(path).model(ids).logits)
    text = "The history of the city, in 1850, had 3 rivers."
    assert theirs.tokenizer(text)["input_ids"] == q.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", REFUSED)
def test_a_spec_no_type_holds_is_refused_before_writing_or_converted_on_request(saved, tmp_path, name):
    q, path = saved[name]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\..* no GGUF type holds exactly.*--requantize"):
        qd.export(path, tmp_path / "gguf", "gguf")
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.iterdir())
    qd.export(path, tmp_path / "gguf", "gguf", requantize=True)
    names = ge.requantized_modules(tmp_path / "gguf" / ge.FILE)
    assert sorted(names) == sorted(q.quant_config["modules"])
    config = json.loads((path / "config.json").read_text())
    converted = ge.with_gguf_weights(qd.load(path).model, config, tmp_path / "gguf" / ge.FILE, names)
    for module_name in names:  # each converted layer is a fresh rounding of our weight onto the GGUF grid
        ours = dequantize_weight(q.model.get_submodule(module_name).quantized_weight())
        theirs = converted.get_submodule(module_name).weight
        assert (theirs - ours).norm() / ours.norm() < 0.15


def test_kv_cache_scales_and_other_architectures_are_refused(saved, tmp_path):
    _, path = saved["int4-sym-g32"]
    qc = json.loads((path / "quant_config.json").read_text())
    with pytest.raises(CheckpointError, match="KV-cache scales"):
        ge.plan({**qc, "kv_cache": {"dtype": "int8"}}, {}, requantize=True)
    with pytest.raises(CheckpointError, match="not a multiple of GGUF's blocks"):
        ge.plan({"modules": {"m": qd.QuantSpec(dtype="int4", group_size=8).to_dict()}}, {"m": (16, 40)}, True)


def test_reexport_is_byte_identical_and_overwrite_replaces_only_our_exports(saved, tmp_path):
    _, path = saved["int4-asym-g64"]
    qd.export(path, tmp_path / "a", "gguf")
    qd.export(path, tmp_path / "b", "gguf")
    assert (tmp_path / "a" / ge.FILE).read_bytes() == (tmp_path / "b" / ge.FILE).read_bytes()
    qd.export(path, tmp_path / "a", "gguf", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError):
        qd.export(path, tmp_path / "other", "gguf", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_the_tokenizer_is_embedded_with_its_types_merges_and_special_ids(saved, tmp_path):
    q, path = saved["int4-sym-g32"]
    qd.export(path, tmp_path / "gguf", "gguf")
    fields = gguf.GGUFReader(tmp_path / "gguf" / ge.FILE).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = q.tokenizer.get_vocab()
    assert len(tokens) == q.model.config.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert types[q.tokenizer.convert_tokens_to_ids("</s>")] == gguf.TokenType.CONTROL
    assert types[vocab[tokens[-1]]] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.merges"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == q.tokenizer.eos_token_id


@pytest.mark.parametrize(("pre", "name"), [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gv.LLAMA3_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
])
def test_pre_tokenizers_llama_cpp_names(pre, name):
    assert gv.pre_tokenizer({"pre_tokenizer": pre}) == name


def test_an_unnamed_pre_tokenizer_is_refused():
    with pytest.raises(CheckpointError, match="not one llama.cpp names"):
        gv.pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_cli_refuses_in_one_line_and_reports_what_requantizing_costs(saved, tmp_path, capsys, data):
    from quantdeploy.cli import main

    _, path = saved["nf4-g32"]
    assert main(["export", str(path), "--format", "gguf", "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--requantize" in err[0] and not (tmp_path / "g").exists()
    text = data / "text" / "wiki_en.test.txt"
    assert main(["export", str(path), "--format", "gguf", "-o", str(tmp_path / "g"), "--requantize",
                 "--kld-text", str(text), "--kld-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "requantized 14 modules" in out and "mean KLD" in out and "over 255 tokens" in out
    _, exact = saved["int4-sym-g32"]
    assert main(["export", str(exact), "--format", "gguf", "-o", str(tmp_path / "e"), "--requantize"]) == 0
    assert "nothing was converted" in capsys.readouterr().out
