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
        self._prefix = 0  # window-scheme offsets into output_ids
        self._read = 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust object
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._emitted = 0  # characters of ``text`` already handed to a stream

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
