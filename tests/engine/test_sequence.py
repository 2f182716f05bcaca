"""Incremental detokenization: the streamed pieces join to the final text, and with ``DecodeStream`` the final
text is what a full decode gives whatever the ordinary token ids (incomplete UTF-8 included)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.engine.sequence import Sequence


def _run(tokenizer, ids: list[int], stream: bool) -> tuple[str, str]:
    seq = Sequence(0, 0, [1], SamplingParams(max_tokens=len(ids)), tokenizer, stop_ids=set())
    if not stream:
        seq._stream = None  # the window scheme, as for a tokenizer without a Rust backend
    pieces = []
    for token in ids:
        seq.receive(token, context_full=False)
        pieces.append(seq.take_text())
    assert seq.finish_reason == "length"
    return "".join(pieces), seq.text


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return tiny_bundle.tokenizer


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streamed_text_is_the_full_decode(tokenizer, data):
    special = set(tokenizer.all_special_ids)  # a special token inside a split character has no meaning
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1).filter(lambda i: i not in special),
                             min_size=1, max_size=24))
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    streamed, final = _run(tokenizer, ids, stream=True)
    assert streamed == final == expected
    # The window scheme gives up waiting for a character after 4 tokens: with runs of stray UTF-8 bytes its
    # replacement characters may differ from a full decode's (vLLM's and TGI's do the same); valid text matches.
    streamed, final = _run(tokenizer, ids, stream=False)
    assert streamed == final
    if "\ufffd" not in expected:
        assert final == expected


def test_a_character_split_across_tokens_is_held_back_until_complete(tokenizer):
    ids = tokenizer("café 東京", add_special_tokens=False).input_ids
    seq = Sequence(0, 0, [1], SamplingParams(max_tokens=50), tokenizer, stop_ids=set())
    for token in ids:
        seq.receive(token, context_full=False)
        assert "\ufffd" not in seq.take_text()
    assert seq.text == "café 東京"
