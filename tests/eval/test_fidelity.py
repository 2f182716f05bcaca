"""The evaluation protocol and metrics, checked against direct computation on a tiny model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import quantdeploy as qd
from quantdeploy.errors import ConfigError, DataError
from quantdeploy.eval.fidelity import EvalProtocol, evaluate, make_windows, use_bos
from quantdeploy.eval.text import load_text, tokenize_prefix


def test_windows_score_every_token_once():
    p = EvalProtocol(max_tokens=None, window=8)
    ws = make_windows(20, p, with_bos=False)
    assert [(w.start, w.end, w.first_scored) for w in ws] == [(0, 8, 1), (8, 16, 9), (16, 20, 17)]
    ws = make_windows(20, p, with_bos=True)
    assert [(w.first_scored, w.end) for w in ws] == [(0, 8), (8, 16), (16, 20)]
    ws = make_windows(20, EvalProtocol(max_tokens=None, window=8, stride=4), with_bos=False)
    scored = [t for w in ws for t in range(w.first_scored, w.end)]
    assert scored == list(range(1, 20))
    assert all(w.end - w.start <= 8 for w in ws)


def test_protocol_validation():
    with pytest.raises(ConfigError, match="stride"):
        EvalProtocol(window=8, stride=9)
    with pytest.raises(ConfigError, match="bos"):
        EvalProtocol(bos="sometimes")


def test_identical_model_has_zero_divergence(tiny_bundle, train_text):
    tokens = tokenize_prefix(tiny_bundle.tokenizer, train_text, 300)
    res = evaluate({"same": tiny_bundle.model}, tiny_bundle.model, tokens, EvalProtocol(max_tokens=300, window=64))
    assert res["same"]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["same"]["top1_agreement"] == 1.0
    assert res["same"]["ppl"] == pytest.approx(res["original"]["ppl"])
    assert res["same"]["tokens_scored"] == 300 - math.ceil(300 / 64)


def test_perplexity_and_kl_match_direct_computation(tiny_bundle, train_text):
    q = qd.quantize(tiny_bundle, qd.RTNConfig(bits=2, group_size=32))
    tokens = tokenize_prefix(tiny_bundle.tokenizer, train_text, 128)
    res = evaluate({"q": q.model}, tiny_bundle.model, tokens, EvalProtocol(max_tokens=128, window=128))
    with torch.no_grad():
        logp = F.log_softmax(tiny_bundle.model(tokens[None]).logits[0, :-1].float(), -1)
        logq = F.log_softmax(q.model(tokens[None]).logits[0, :-1].float(), -1)
    nll = -logq.gather(-1, tokens[1:, None]).squeeze(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert res["q"]["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert res["q"]["kld_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert res["q"]["kld_median"] == pytest.approx(float(kl.median()), rel=1e-2)
    assert res["q"]["kld_max"] == pytest.approx(float(kl.max()), rel=1e-5)
    assert res["q"]["kld_mean"] > 0


def test_bos_auto_follows_the_tokenizer(tiny_bundle):
    tok = tiny_bundle.tokenizer  # our tiny tokenizer defines <s> but does not add it
    assert use_bos(tok, EvalProtocol(bos="auto")) is None
    assert use_bos(tok, EvalProtocol(bos="always")) == tok.bos_token_id


def test_text_sources_and_their_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    assert load_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    with pytest.raises(DataError, match="no such text file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not a JSON object"):
        load_text(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="no string field"):
        load_text(tmp_path / "nofield.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")


def test_too_short_text_is_a_clear_error(tiny_bundle):
    tokens = tokenize_prefix(tiny_bundle.tokenizer, "a few words", 100)
    with pytest.raises(DataError, match="only .* tokens but 100 were asked for"):
        evaluate({"m": tiny_bundle.model}, None, tokens, EvalProtocol(max_tokens=100, window=16))


def test_tokenize_prefix_matches_full_tokenization(tiny_bundle, train_text):
    text = train_text[:20_000]
    full = tiny_bundle.tokenizer(text, add_special_tokens=False).input_ids
    assert tokenize_prefix(tiny_bundle.tokenizer, text, 500).tolist() == full[:500]


def test_binary_files_are_not_text(tmp_path):
    """Issue 12, item 11: 3,000 NUL bytes were accepted as calibration text and calibrated for 172 s."""
    from quantdeploy.quant.calibration import CalibrationConfig, check_source

    (tmp_path / "nul.txt").write_bytes(b"\x00" * 3000)
    (tmp_path / "ctl.txt").write_bytes(bytes(range(1, 9)) * 400)
    for name in ("nul.txt", "ctl.txt"):
        with pytest.raises(DataError, match="is binary, not text"):
            load_text(tmp_path / name)
        with pytest.raises(DataError, match="is binary, not text"):
            check_source(CalibrationConfig(source=str(tmp_path / name)))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not a JSON object"):
        check_source(CalibrationConfig(source=str(tmp_path / "bad.jsonl")))
    with pytest.raises(DataError, match="a quantized KV cache needs calibration data"):
        check_source(CalibrationConfig(), "a quantized KV cache")


def test_the_demo_text_ships_in_the_package(data):
    """Issue 12, item 12: the demo needed shared/ beside the repository. The packaged slice starts the
    test split, so the demo's first 32,768 tokens (what it scores) are the same."""
    from quantdeploy.demo import default_text_path

    packaged = load_text(default_text_path())
    assert "shared" not in str(default_text_path())
    full = (data / "text" / "wiki_en.test.txt").read_text()
    assert full.startswith(packaged) and len(packaged) > 32768 * 6  # tokenize_prefix's first cut is 6 chars/token
