"""The engine's prefills: whole prompts batched together, long ones a chunk per step, and the first token.

Part of ``Engine`` (``engine/engine.py``, which owns the state these methods use: the model, the block
table, the sampler, the rows' positions, the queues of added and chunked sequences). Whole prompts
added since the last step go in right-padded batches of at most ``max_prefill_tokens`` tokens, a small
batch replaying a CUDA graph (``engine/prefill_graphs.py``); a prompt longer than
``prefill_chunk_tokens`` is prefilled one chunk per step, so the rows decoding meanwhile wait for one
chunk rather than the whole prompt; on CUDA a chunk replays a graph too. A resumed (preempted) sequence
is prefilled from its prompt and the output it had, like any other.
"""

from __future__ import annotations

import logging
import random

import torch

from quantdeploy.engine.prefill_graphs import pack_chunk, pack_rows, run_packed
from quantdeploy.engine.sequence import Sequence

log = logging.getLogger(__name__)


class Prefill:
    def _prefill_added(self) -> list[Sequence]:
        """Prefill the added sequences in batches of at most ``max_prefill_tokens`` (padded) tokens, in
        the order they came, and one chunk of the oldest long prompt. A batch that raises fails its own
        sequences (reason "error") and no other."""
        failed: list[Sequence] = []
        if self.prefill_chunk_tokens:
            long = [s for s in self._unfilled if s.context_len > self.prefill_chunk_tokens]
            self._unfilled = [s for s in self._unfilled if s not in long]
            self._chunking.extend(long)
        if self._chunking:
            seq = self._chunking[0]
            try:
                if self._prefill_chunk(seq):
                    self._chunking.pop(0)
            except Exception as err:
                self._chunking.pop(0)
                failed.extend(self._fail_prefill([seq], err))
        while self._unfilled:
            batch, longest = [], 0
            for seq in self._unfilled:
                longest_with = max(longest, seq.context_len)
                if batch and longest_with * (len(batch) + 1) > self.max_prefill_tokens:
                    break
                batch.append(seq)
                longest = longest_with
            del self._unfilled[:len(batch)]
            try:
                self._prefill(batch, longest)
            except Exception as err:  # e.g. out of memory for this batch: its requests fail, the engine goes on
                failed.extend(self._fail_prefill(batch, err))
        return failed

    def _fail_prefill(self, batch: list[Sequence], err: Exception) -> list[Sequence]:
        log.exception("prefill of %d sequences failed", len(batch))
        for seq in batch:
            seq.finish("error")
            seq.error = f"prefill failed: {type(err).__name__}: {err}"
            self._free(seq)
        return batch

    def _prefill_chunk(self, seq: Sequence) -> bool:
        """Prefill the next ``prefill_chunk_tokens`` of ``seq``'s context after what its row holds; True when
        that was the last chunk (its first token is sampled as a whole prefill's would be). Between chunks
        the decode steps that sweep its row write at the next chunk's start, which the chunk overwrites."""
        context = seq.prompt_ids + seq.output_ids
        start, length = seq.prefilled, len(context)
        chunk = self.prefill_chunk_tokens
        end = min(start + chunk, length)
        pinned = (lambda t: t.pin_memory()) if self.device.type == "cuda" else (lambda t: t)
        data = pinned(pack_rows([context], [seq.row], 1, length, self.scratch_row)).to(self.device, non_blocking=True)
        self.table.sync()
        if self.prefill_graphs is not None and self.prefill_graphs.has_chunk(start, start + chunk):
            _, logits = self.prefill_graphs.run_chunk(start + chunk, pinned(pack_chunk(context, seq.row, start, chunk)))
        else:
            logits = self.model.prefill(data[:, start:end], data[:, length], start=start)[:, 0]
        seq.prefilled = end
        if end < length:
            self.positions[seq.row] = end
            return False
        self._first_tokens([seq], [context], data[:, :length], data[:, length], data[:, length + 1], logits)
        return True

    def _prefill(self, batch: list[Sequence], longest: int) -> None:
        """One forward over ``batch``'s prompts, right-padded to ``longest`` (or to the shape of a prefill
        graph, padding rows on the scratch row); samples each first token."""
        # Tokens, rows and lengths go to the device in one copy from pinned memory, which does not wait
        # for the decode step still running there; a small prefill replays a CUDA graph.
        n = len(batch)
        shape = self.prefill_graphs.shape(n, longest) if self.prefill_graphs is not None else None
        b, t = shape or (n, longest)
        row_ids = [s.row for s in batch]
        contexts = [s.prompt_ids + s.output_ids for s in batch]  # a resumed sequence recomputes its output too
        host = pack_rows(contexts, row_ids, b, t, self.scratch_row)
        self.table.sync()
        if self.device.type == "cuda":
            host = host.pin_memory()
        if shape is not None:
            data, logits = self.prefill_graphs.run(shape, host)
        else:
            data = host.to(self.device, non_blocking=True)
            logits = run_packed(self.model, data)
        self._first_tokens(batch, contexts, data[:n, :longest], data[:n, t], data[:n, t + 1], logits[:n])

    def _first_tokens(self, batch: list[Sequence], contexts: list[list[int]], tokens: torch.Tensor, rows: torch.Tensor,
                      lengths: torch.Tensor, logits: torch.Tensor) -> None:
        """After a prefill of ``batch`` (device ``tokens``, ``rows``, ``lengths``; last-position ``logits``):
        sampling state, first tokens, and the rows' positions for decode."""
        row_ids = [s.row for s in batch]
        for s in batch:  # kept on the sequence: a resumed one draws on with the same seed
            if s.seed is None:
                s.seed = s.params.seed if s.params.seed is not None else random.getrandbits(32)
        seeds = [s.seed for s in batch]
        self.sampler.assign(rows, row_ids, [s.params for s in batch], seeds, tokens, [len(c) for c in contexts],
                            steps=[len(s.output_ids) for s in batch])
        first = self.sampler.sample(logits, rows, row_ids)
        self.next_token.index_copy_(0, rows, first.clamp(min=0))
        self.positions.index_copy_(0, rows, lengths)
        self.growing.index_fill_(0, rows, 1)
        for seq in batch:
            seq.launched += 1
            seq.prefilled = seq.context_len
        self._push(first, list(enumerate(batch)))
        self.counters.prefill_batches += 1
        self.counters.prefill_sequences += len(batch)
