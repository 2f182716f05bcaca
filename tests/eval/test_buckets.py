"""KL divergence by bucket (``eval/buckets.py``): the cuts are exact partitions of the scored tokens."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.eval.buckets import POSITION_EDGES, bucket_means, document_ids, kld_buckets


def test_bucket_means_put_each_key_in_its_half_open_range():
    kld = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    keys = torch.tensor([1, 4, 5, 31, 300])
    rows = bucket_means(kld, keys, (1, 5, 32, 256))
    assert [r["bucket"] for r in rows] == ["1-4", "5-31", "32-255", "256+"]
    assert [r["tokens"] for r in rows] == [2, 2, 0, 1]
    assert [r["kld_mean"] for r in rows] == [1.5, 3.5, None, 5.0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=4, max_size=60), st.integers(0, 2**31 - 1))
def test_every_scored_token_lands_in_one_bucket_of_each_cut(stream, seed):
    tokens = torch.tensor(stream)
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(1, len(stream))
    kld = torch.rand(index.numel(), generator=g)
    position = index % 7 + 1
    docs = torch.cumsum((torch.rand(len(stream), generator=g) < 0.2).long(), 0)
    cuts = kld_buckets(kld, index, position, tokens, docs)
    for cut in ("frequency", "position", "documents"):
        rows = cuts[cut]
        assert sum(r["tokens"] for r in rows) == index.numel()
        total = sum(r["kld_mean"] * r["tokens"] for r in rows if r["tokens"])
        assert abs(total - float(kld.double().sum())) < 1e-9
    counts = torch.bincount(tokens)[tokens[index]]
    assert cuts["frequency"][0]["tokens"] == int((counts < 5).sum())
    assert cuts["position"][0]["tokens"] == int((position < POSITION_EDGES[1]).sum())


def test_documents_follow_the_blank_lines_of_the_text(tiny_bundle):
    tokenizer = tiny_bundle.tokenizer
    text = "The first document has words.\n\nThe second one\nhas two lines.\n \n\nAnd a third."
    tokens = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    docs = document_ids(tokenizer, text, tokens)
    assert docs is not None and docs.tolist() == sorted(docs.tolist()) and set(docs.tolist()) == {0, 1, 2}
    first = tokenizer.decode(tokens[docs == 0].tolist())
    assert first.startswith("The first document") and "second" not in first
    assert "third" in tokenizer.decode(tokens[docs == 2].tolist())
    assert document_ids(tokenizer, text, tokens.flip(0)) is None  # tokens the tokenizer does not reproduce
