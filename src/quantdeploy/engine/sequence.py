"""One sequence in the engine: its tokens, its incremental text, and its stop conditions.

Detokenization is incremental. With a fast (Rust) tokenizer each token goes through the tokenizers
library's ``DecodeStream``, as in vLLM's V1 engine: one native call per token (~2.5 µs against ~16 µs
for the window scheme, measured here on SmolLM2's tokenizer; at 64 rows that is most of the host
time of a decode step). Other tokenizers use the prefix/read-offset scheme of TGI and vLLM: each new
token decodes a short window of recent tokens, waiting up to 4 tokens for an incomplete UTF-8
character (after that, runs of stray bytes may show other replacement characters than a full decode).
Either way text is released only once it no longer ends in an incomplete UTF-8 character. Stop strings are searched in the text as it grows; the text is cut where the first
one starts, and streaming holds back any tail that could still become the start of a stop string,
so streamed pieces always join to exactly the final text. A stop token (EOS or a requested id) ends
the sequence and is not part of its output.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import RequestError


class Sequence:
    def __init__(self, seq_id: int, row: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Any,
                 stop_ids: set[int]) -> None:
        self.id, self.row = seq_id, row
        self.prompt_ids, self.params = prompt_ids, params
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # what went wrong, when finish_reason is "error"
        self.launched = 0  # tokens whose computation has been queued on the device
        self.received = 0  # tokens read back (including a final stop token)
        self.parked = False  # no more steps will be launched for it
        self.seed: int | None = None  # the sampling seed, drawn at the first prefill unless the request gave one
        self.prefilled = 0  # context positions its cache row holds from prefill (chunk by chunk for a long prompt)
        self._prefix = 0  # window-scheme offsets into output_ids
        self._read = 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust object
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._emitted = 0  # characters of ``text`` already handed to a stream

    @property
    def feed_position(self) -> int:
        """Where the token this sequence feeds to its next decode step is written in the cache."""
        return len(self.prompt_ids) + self.launched - 1

    @property
    def context_len(self) -> int:
        """Tokens a prefill of this sequence would take now: its prompt and the output it has so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def receive(self, token: int, context_full: bool) -> None:
        """Take the next generated token and apply every stop condition."""
        self.received += 1
        if token < 0:  # the sampler's mark for non-finite logits
            self.error = "the model produced non-finite logits for this request"
            self.finish("error")
            return
        if token in self.stop_ids:
            self._extend_text(final=True)
            self.finish("stop")
            return
        self.output_ids.append(token)
        last = self.received >= self.params.max_tokens or context_full
        self._extend_text(final=last)
        if last:
            self.finish("length")

    def _extend_text(self, final: bool = False) -> None:
        if self.tokenizer is None or self.finished:
            return
        if self._stream is not None:
            delta = ""
            if len(self.output_ids) > self._read:  # a stop token is no part of the text: not fed
                self._read = len(self.output_ids)
                delta = self._stream.step(self._backend, self.output_ids[-1]) or ""
            if final:  # the stream may hold bytes of an incomplete character: end as a full decode does
                full = self.tokenizer.decode(self.output_ids, skip_special_tokens=True)
                if full.startswith(self.text):
                    delta = full[len(self.text):]
        else:
            delta = self._window_delta(final)
        if not delta:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text += delta
        for stop in self.params.stop:
            at = self.text.find(stop, start)
            if at != -1:
                self.text = self.text[:at]
                self.finish("stop")
                return

    def _window_delta(self, final: bool) -> str:
        ids = self.output_ids
        before = self.tokenizer.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        now = self.tokenizer.decode(ids[self._prefix:], skip_special_tokens=True)
        if not final and now.endswith("\ufffd") and len(ids) - self._read < 4:
            return ""  # an incomplete UTF-8 character: wait for the rest of its bytes
        self._prefix, self._read = self._read, len(ids)
        return now[len(before):]

    def take_text(self) -> str:
        """The text not yet streamed, minus any tail that might still turn into a stop string."""
        end = len(self.text)
        if not self.finished:
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``; with ``chat``, as the user turn of the tokenizer's chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt).input_ids)


def check_lengths(max_seq_len: int, n_prompt: int, params: SamplingParams) -> None:
    """Raise RequestError if a prompt of ``n_prompt`` tokens with ``params`` cannot fit ``max_seq_len``."""
    if n_prompt == 0:
        raise RequestError("the prompt is empty; give at least one token")
    if n_prompt >= max_seq_len:
        raise RequestError(f"the prompt has {n_prompt} tokens but the context window is {max_seq_len}; "
                           "shorten the prompt (or load the engine with a larger max_seq_len)")
    if n_prompt + params.max_tokens > max_seq_len:
        raise RequestError(f"max_tokens {params.max_tokens} + {n_prompt} prompt tokens exceeds the context window "
                           f"of {max_seq_len}; lower max_tokens to at most {max_seq_len - n_prompt}")


def eos_ids(tokenizer: Any, hf_config: Any) -> set[int]:
    """The end-of-sequence ids the tokenizer and the model's config name."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
