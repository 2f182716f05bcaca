"""Shared fixtures: the test data folder, a tiny random Llama with a real (tiny) tokenizer, and the
bundled SmolLM2 for the tests marked slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    if os.environ.get("QUANTDEPLOY_DATA"):
        return Path(os.environ["QUANTDEPLOY_DATA"])
    return REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data() -> Path:
    path = data_dir()
    assert (path / "text" / "wiki_en.test.txt").is_file(), f"test data missing under {path}"
    return path


def make_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on ``text``, wrapped for transformers (with BOS/EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(folder: Path, text: str, seed: int = 0, tie: bool = True) -> Path:
    """Save a tiny random Llama (2 layers, hidden 64, GQA) and its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(text)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # give the weights some outlier structure, as trained models have
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + 3 * (torch.rand(p.shape[1]) < 0.05).float())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def train_text(data) -> str:
    return (data / "text" / "wiki_en.train.txt").read_text()[:200_000]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, train_text) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), train_text)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama_dir):
    import quantdeploy as qd

    return qd.load_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def bundled_bundle():
    """The real bundled SmolLM2-135M-Instruct (converted from its GGUF once, then cached)."""
    import quantdeploy as qd

    return qd.load_model("bundled")
