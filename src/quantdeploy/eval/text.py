"""Evaluation text: read it from a local file or a Hugging Face dataset, and tokenize a prefix.

Sources:

- a ``.txt`` file: used as is (the bundled test files separate documents with ``"\\n\\n\\n"``);
- a ``.jsonl`` file: one JSON object per line; the ``text`` field (or ``content``) of each line,
  joined with blank lines;
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset's ``text`` column, when the ``datasets``
  package and a cache or network have it (split defaults to ``test``).

Tokenization: the text is tokenized in one piece without special tokens; only as many characters as
needed for ``max_tokens`` tokens are tokenized, so a large file costs little.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from quantdeploy.errors import DataError

TEXT_FIELDS = ("text", "content")


def load_text(source: str | Path) -> str:
    """The text of ``source`` (see the module docstring); one-line errors for bad input."""
    text = str(source)
    if text.startswith("hf:"):
        return _load_hf_dataset(text[3:])
    path = Path(text).expanduser()
    if not path.is_file():
        raise DataError(f"no such text file: {path}")
    raw = read_text_file(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        raw = _jsonl_text(path, raw)
    if not raw.strip():
        raise DataError(f"{path} holds no text")
    return raw


def read_text_file(path: Path) -> str:
    """A file's text, refused when it is not text: bytes that are not UTF-8, NUL bytes, or mostly
    control characters (a binary file that happens to decode would otherwise be scored or calibrated on)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; pass a .txt or .jsonl file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    sample = raw[:65536]
    control = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\n\r\t\f")
    if "\x00" in sample or control > 0.01 * len(sample):
        raise DataError(f"{path} is binary, not text ({'NUL bytes' if chr(0) in sample else 'control characters'}); "
                        "pass a .txt or .jsonl file")
    return raw


def iter_jsonl(path: Path, raw: str):
    """``(where, record)`` for each non-blank line of a .jsonl file; one-line errors for bad JSON."""
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno} is not a JSON object; a .jsonl file needs one object per line") from None


def _jsonl_text(path: Path, raw: str) -> str:
    parts = []
    for where, record in iter_jsonl(path, raw):
        field = next((f for f in TEXT_FIELDS if isinstance(record, dict) and isinstance(record.get(f), str)), None)
        if field is None:
            raise DataError(f"{where} has no string field named {' or '.join(TEXT_FIELDS)}")
        parts.append(record[field])
    return "\n\n".join(parts)


def _load_hf_dataset(spec: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise DataError("Hugging Face dataset names need the 'datasets' package; run: pip install datasets")
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        data = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as err:  # offline, unknown name, no cache: the library raises many types
        raise DataError(f"cannot load dataset '{spec}' (offline and not cached?): {str(err).splitlines()[0]}") from None
    if "text" not in data.column_names:
        raise DataError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(data.column_names)})")
    return "\n\n".join(data["text"])


def tokenize_prefix(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of ``text`` (all when None), as a 1-D int64 tensor."""
    if max_tokens is None:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    chars = max_tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False).input_ids
        # A cut inside a word can change its last token: keep one token of margin.
        if len(ids) > max_tokens or chars >= len(text):
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
