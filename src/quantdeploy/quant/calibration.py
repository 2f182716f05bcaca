"""Calibration data: token samples for methods that look at activations (GPTQ, AWQ, SmoothQuant).

Sources (``CalibrationConfig.source``):

- a ``.txt`` file: plain text;
- a ``.jsonl`` file of fine-tuning data, one record per line, rendered the way the model saw it:
  ``{"messages": [{"role", "content"}, ...]}`` through the tokenizer's chat template;
  ``{"prompt", "completion"}`` or ``{"instruction", "input"?, "output"}`` as a user/assistant chat;
  ``{"text"}`` as plain text;
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset's ``text`` column (cache or network needed).

Records are rendered and plain text is cut into pieces of about 16 KB at line breaks; in a seeded
order, they are tokenized into one stream (records joined with EOS) until it holds four times the
tokens needed, so a large file costs no more than that to read, yet samples come from all over it.
``num_samples`` windows of ``seq_len`` tokens are then drawn without overlap at seeded random offsets. When the data holds fewer
windows than asked for, all of them are used, the reduction is logged and recorded (``num_samples``
in :class:`CalibrationData`), which the checkpoint manifest keeps together with the samples' sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(Config):
    TYPE = "calibration"
    VERSION = 1

    source: str = ""
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"calibration num_samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 16:
            raise ConfigError(f"calibration seq_len must be at least 16 tokens, got {self.seq_len}")


@dataclasses.dataclass
class CalibrationData:
    tokens: torch.Tensor  # [num_samples, seq_len] int64
    sha256: str  # of the token ids, so the same data gives the same hash on any machine
    requested: int  # num_samples asked for; tokens.shape[0] may be smaller

    @property
    def num_samples(self) -> int:
        return int(self.tokens.shape[0])

    def record(self) -> dict:
        return {"sha256": self.sha256, "num_samples": self.num_samples, "requested_samples": self.requested,
                "seq_len": int(self.tokens.shape[1])}


def check_source(config: CalibrationConfig, needed_by: str = "this method") -> None:
    """Check what can be checked without a tokenizer (the source is given, exists, is text, a .jsonl
    parses), so that bad data fails before a model is loaded; ``load_calibration`` checks the rest."""
    from quantdeploy.eval.text import iter_jsonl, load_text, read_text_file

    if not config.source:
        raise DataError(f"{needed_by} needs calibration data; pass --calib FILE (.txt, .jsonl) or hf:NAME")
    path = Path(config.source).expanduser()
    if config.source.startswith("hf:") or path.suffix.lower() not in (".jsonl", ".json"):
        if not config.source.startswith("hf:"):
            load_text(config.source)
        return
    if not path.is_file():
        raise DataError(f"no such calibration file: {path}")
    records = 0
    for where, record in iter_jsonl(path, read_text_file(path)):
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a JSON object")
        records += 1
    if not records:
        raise DataError(f"{path} holds no records")


def load_calibration(tokenizer, config: CalibrationConfig, needed_by: str = "this method") -> CalibrationData:
    """Token windows for calibration; one-line errors for missing, empty, short or malformed data."""
    if not config.source:
        raise DataError(f"{needed_by} needs calibration data; pass --calib FILE (.txt, .jsonl) or hf:NAME")
    documents, records = _documents(tokenizer, config.source)
    needed = config.num_samples * config.seq_len
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(config.seed)
    stream: list[int] = []
    for index in torch.randperm(len(documents), generator=gen).tolist():  # documents in a seeded order
        stream += tokenizer(documents[index], add_special_tokens=False).input_ids
        if records and eos is not None:
            stream.append(eos)
        if len(stream) >= 4 * needed:  # plenty to draw from; the rest need not be tokenized
            break
    n_windows = len(stream) // config.seq_len
    if n_windows == 0:
        raise DataError(f"calibration data {config.source} holds {len(stream)} tokens, fewer than one sample of "
                        f"seq_len {config.seq_len}; pass more text or a smaller --calib-seq-len")
    ids = torch.tensor(stream[: n_windows * config.seq_len], dtype=torch.long).reshape(n_windows, config.seq_len)
    order = torch.randperm(n_windows, generator=gen)
    if n_windows < config.num_samples:
        log.warning("calibration data holds %d samples of %d tokens, fewer than the %d asked for: using %d",
                    n_windows, config.seq_len, config.num_samples, n_windows)
    tokens = ids[order[: config.num_samples]]
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return CalibrationData(tokens=tokens, sha256=digest, requested=config.num_samples)


def _documents(tokenizer, source: str) -> tuple[list[str], bool]:
    """The source as documents, and whether they are separate records (joined with EOS) rather than
    pieces of one running text (cut at line breaks every ``TEXT_CHUNK`` characters or so)."""
    from quantdeploy.eval.text import iter_jsonl, load_text, read_text_file

    path = Path(source).expanduser()
    if source.startswith("hf:") or path.suffix.lower() not in (".jsonl", ".json"):
        return _chunks(load_text(source)), False
    if not path.is_file():
        raise DataError(f"no such calibration file: {path}")
    raw = read_text_file(path)
    docs = [render_record(tokenizer, record, where) for where, record in iter_jsonl(path, raw)]
    if not docs:
        raise DataError(f"{path} holds no records")
    return docs, True


TEXT_CHUNK = 16384


def _chunks(text: str) -> list[str]:
    """``text`` cut after the first line break past every ``TEXT_CHUNK`` characters."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + TEXT_CHUNK)
        end = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def render_record(tokenizer, record: object, where: str) -> str:
    """One fine-tuning record as the text the model was trained on."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object")
    if isinstance(record.get("messages"), list):
        return _chat(tokenizer, record["messages"], where)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return _chat(tokenizer, [{"role": "user", "content": record["prompt"]},
                                 {"role": "assistant", "content": record["completion"]}], where)
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return _chat(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], where)
    if isinstance(record.get("text"), str):
        return record["text"]
    raise DataError(f"{where}: expected 'messages', 'prompt'+'completion', 'instruction'+'output' or 'text'")


def _chat(tokenizer, messages: list, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where} is chat data but the tokenizer has no chat template; use plain text records")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: each message needs 'role' and 'content'")
    return tokenizer.apply_chat_template(messages, tokenize=False)
