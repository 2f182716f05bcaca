"""The engine on CUDA: the compiled, CUDA-graph decode step gives the tokens of the eager one, and
batched decode with sequences joining and leaving matches one-at-a-time decoding."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.models.bundle import ModelBundle, SourceInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _bundle(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return ModelBundle(model=model, tokenizer=None, source=SourceInfo(path="memory", kind="memory"))


PROMPTS = [[5, 17, 99, 3, 250, 7], [1, 2, 3], list(range(40, 80)), [300]]


def _run(engine: Engine, params: SamplingParams) -> list[list[int]]:
    seqs = []
    for prompt in PROMPTS:  # join one by one, a step apart
        seqs.append(engine.add(prompt, params))
        engine.step()
    while engine.running:
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_matches_eager(dtype):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = Engine.from_bundle(_bundle(dtype), "cuda", max_batch=4, max_seq_len=128, compile=False)
    compiled = Engine.from_bundle(_bundle(dtype), "cuda", max_batch=4, max_seq_len=128, compile=True)
    assert compiled.compiled
    a, b = _run(eager, params), _run(compiled, params)
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    assert agree >= (1.0 if dtype == torch.float32 else 0.9)  # bf16: fused kernels round differently


def test_batched_equals_alone_and_sampling_is_seeded_on_gpu():
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    engine = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128)
    together = _run(engine, params)
    alone = [engine.generate(p, params).token_ids for p in PROMPTS]
    assert together == alone
