"""Calibration data: sources, fine-tuning formats rendered through the chat template, clear errors."""

import json

import pytest

from quantdeploy.errors import ConfigError, DataError
from quantdeploy.quant.calibration import CalibrationConfig, load_calibration

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture()
def tok(tiny_bundle):
    import copy

    t = copy.deepcopy(tiny_bundle.tokenizer)
    t.chat_template = CHAT_TEMPLATE
    return t


def test_text_samples_are_seeded_and_hashed(tok, data):
    cfg = CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=6, seq_len=32, seed=1)
    a, b = load_calibration(tok, cfg), load_calibration(tok, cfg)
    assert a.tokens.shape == (6, 32) and a.sha256 == b.sha256
    assert load_calibration(tok, cfg.replace(seed=2)).sha256 != a.sha256


def test_fine_tuning_jsonl_is_rendered_through_the_chat_template(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]},
            {"prompt": "two plus two", "completion": "four"},
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"text": "plain words"}] * 20
    path = tmp_path / "ft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_calibration(tok, CalibrationConfig(source=str(path), num_samples=8, seq_len=32))
    text = tok.decode(data.tokens.flatten())
    assert "user:" in text and "assistant:" in text


def test_more_samples_than_the_data_holds_is_a_logged_reduction(tok, tmp_path, caplog):
    path = tmp_path / "small.txt"
    path.write_text("word " * 400)
    with caplog.at_level("WARNING"):
        data = load_calibration(tok, CalibrationConfig(source=str(path), num_samples=100, seq_len=32))
    assert 0 < data.num_samples < 100 and data.record()["requested_samples"] == 100
    assert "fewer than the 100 asked for" in caplog.text


@pytest.mark.parametrize("content, match", [
    ("", "holds no text"),
    ("too short", "fewer than one sample"),
])
def test_empty_or_short_text(tok, tmp_path, content, match):
    path = tmp_path / "c.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_calibration(tok, CalibrationConfig(source=str(path), num_samples=4, seq_len=64))


def test_wrong_formats(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not a JSON object"):
        load_calibration(tok, CalibrationConfig(source=str(bad)))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match="expected 'messages'"):
        load_calibration(tok, CalibrationConfig(source=str(odd)))
    with pytest.raises(DataError, match="needs calibration data"):
        load_calibration(tok, CalibrationConfig())
    with pytest.raises(DataError, match="no such calibration file"):
        load_calibration(tok, CalibrationConfig(source=str(tmp_path / "none.jsonl")))
    with pytest.raises(ConfigError, match="seq_len"):
        CalibrationConfig(seq_len=4)
