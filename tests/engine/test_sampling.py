"""The batched sampler on tiny shapes: per-row parameters set in one call, repetition penalty as
transformers applies it, seeded draws independent of the rows beside them."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.engine.sampling import BatchSampler, SamplingParams


def _sampler(rows_params: dict[int, SamplingParams], prompts: dict[int, list[int]], vocab: int = 50) -> BatchSampler:
    sampler = BatchSampler(4, vocab, "cpu")
    row_ids = sorted(rows_params)
    longest = max(len(p) for p in prompts.values())
    padded = torch.tensor([prompts[r] + [0] * (longest - len(prompts[r])) for r in row_ids])
    sampler.assign(torch.tensor(row_ids), row_ids, [rows_params[r] for r in row_ids], [7 + r for r in row_ids],
                   padded, [len(prompts[r]) for r in row_ids])
    return sampler


def test_assign_sets_each_row_and_marks_prompts_only_where_penalized():
    greedy, hot = SamplingParams(), SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.5)
    sampler = _sampler({3: greedy, 1: hot}, {3: [4, 5], 1: [6, 7, 8]})
    assert sampler.temperature.tolist() == [0.0, 0.800000011920929, 0.0, 0.0]
    assert sampler.top_k.tolist() == [0, 5, 0, 0] and sampler.seed.tolist() == [0, 8, 0, 10]
    assert sampler.seen[1].nonzero().flatten().tolist() == [6, 7, 8] and not sampler.seen[3].any()


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompt = [3, 9, 9, 20]
    sampler = _sampler({0: SamplingParams(repetition_penalty=1.7)}, {0: prompt})
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt]), logits.clone()).argmax(-1)
    assert sampler.sample(logits, slice(0, 1)).tolist() == ref.tolist()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(seed, row):
    params = SamplingParams(temperature=1.0, seed=seed)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    alone = BatchSampler(4, 50, "cpu")
    alone.assign(torch.tensor([0]), [0], [params], [seed], torch.tensor([[1]]), [1])
    shared = BatchSampler(4, 50, "cpu")
    others = [SamplingParams(temperature=0.5, top_p=0.5)] * 3
    ids = [r for r in range(4) if r != row]
    shared.assign(torch.tensor(ids + [row]), ids + [row], others + [params], [1, 2, 3, seed],
                  torch.ones(4, 1, dtype=torch.long), [1] * 4)
    for _ in range(3):
        a = alone.sample(logits[row:row + 1], slice(0, 1))
        b = shared.sample(logits, slice(0, 4))
        assert a.item() == b[row].item()
