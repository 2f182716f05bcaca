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
