"""Loading sources: HF folders, LoRA adapters merged with peft, and clear errors."""

import pytest
import torch

import quantdeploy as qd
from quantdeploy.errors import ModelSourceError


def test_hf_folder_loads_with_source_hash(tiny_llama_dir, tiny_bundle):
    assert tiny_bundle.source.kind == "hf-folder" and len(tiny_bundle.source.sha256) == 64
    assert tiny_bundle.tokenizer("hello world").input_ids


def test_missing_path_and_non_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        qd.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="not a model folder"):
        qd.load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        qd.load_model(tmp_path / "weights.bin")


def test_lora_adapter_is_merged_like_peft(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained adapter: B is no longer zero
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 300, (1, 16))

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    merged = qd.load_model(tiny_llama_dir, adapter=tmp_path / "adapter")
    plain = qd.load_model(tiny_llama_dir)
    with torch.no_grad():
        expected = reference(ids).logits
        got = merged.model(ids).logits
        assert not torch.allclose(plain.model(ids).logits, expected, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert merged.source.adapter["sha256"]
    assert not any("lora" in n for n, _ in merged.model.named_parameters())


def test_bad_adapter_folder(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelSourceError, match="no such adapter folder"):
        qd.load_model(tiny_llama_dir, adapter=tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(ModelSourceError, match="not a PEFT adapter folder"):
        qd.load_model(tiny_llama_dir, adapter=tmp_path / "a")


def test_one_of_our_checkpoints_is_not_loaded_as_a_plain_model(tiny_bundle, tmp_path):
    """Issue 12, item 1: re-quantizing a checkpoint gave random weights and exit 0."""
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32)), tmp_path / "q4")
    with pytest.raises(ModelSourceError, match="is a quantdeploy checkpoint"):
        qd.load_model(tmp_path / "q4")


def test_a_folder_whose_weights_do_not_fill_its_config_is_refused(tiny_bundle, tmp_path):
    """Issue 12, item 2: quantized tensors without quant_config.json and manifest.json loaded as random weights."""
    folder = tmp_path / "q4"
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32)), folder)
    (folder / "quant_config.json").unlink()
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelSourceError, match="holds quantized weights"):
        qd.load_model(folder)
    with pytest.raises(ModelSourceError, match="holds quantized weights"):
        qd.load(folder)
    from safetensors.torch import load_file, save_file  # scales alone (no qweight) are named as well

    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.endswith(".qweight")}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"holds quantized weights \(e.g. .*\.scales\)"):
        qd.load_model(folder)


def test_missing_and_misshapen_weights_are_refused(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for edit, expected in ((lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "weights missing"),
                           (lambda t: t.update({"model.norm.weight": torch.ones(8)}), "different shape")):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_llama_dir, folder)
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelSourceError, match=expected):
            qd.load_model(folder)


def test_an_adapter_for_another_shape_names_the_mismatch(tiny_llama_dir, tmp_path):
    """Issue 12, item 11: the message stopped at 'Error(s) in loading state_dict for PeftModel:'."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelSourceError, match=r"size mismatch for .*q_proj.*another base model") as err:
        qd.load_model(tiny_llama_dir, adapter=tmp_path / "adapter")
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_is_refused_before_any_conversion(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        qd.load_model(tmp_path / "m.gguf")
