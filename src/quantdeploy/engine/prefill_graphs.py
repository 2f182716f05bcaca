"""Prefill forwards replayed from CUDA graphs at bucketed shapes, so a small prefill costs its device time.

Why: an eager prefill launches ~40 kernels per layer, and on a GPU the host takes longer to launch them
than the device takes to run them. Measured on the Llama-3.1-8B shape on an H200
(``benchmarks/prefill_gpu.py``): 22-43 ms for 1 to 32 prompts of 32 tokens, the host busy all along;
a decode step of 64 rows takes 8 ms. Under load a server prefills whatever
arrived between two decode steps, and every running row waits for that forward, so each small
prefill cost about three decode steps. Replayed from a graph, the same forward is one launch.

Shapes: the batch is padded to a power of two (or ``max_batch``), the prompt length to a multiple of
16 up to 64, then to 96, 128, 192, 256, 384 or 512; graphs exist up to ``max_tokens`` padded tokens.
Past that a forward is bound by its math, and eager launches hide behind it. Padding rows prefill
token 0 into the *scratch row* of the KV cache (row ``max_batch``, which no sequence owns), so they
cannot touch a live row; padding positions of a real row land past its prompt, where nothing reads
them before decode writes over them (as in any right-padded prefill).

Each graph reads one static input ``[b, t + 2]`` (per row: ``t`` tokens, the cache row, the prompt
length), filled by one host-to-device copy, and writes each row's last-token logits into one static
output shared by every graph. The graphs share one memory pool: they never run at once. ``capture``
records every shape up front (50 shapes in 9.6 s for the 8B model, H200), so serving never stalls on
a capture; a shape met before that is captured when first used.

Chunks of a long prompt (``prefill_chunk_tokens``, ``engine/prefill.py``) replay graphs too, one per
cached length ``kv_len`` = C, 2C, 3C, ... (C the chunk size): chunk ``k`` of a prompt runs at positions
``kC..(k+1)C-1`` and attends causally over exactly ``(k+1)C`` positions, so its graph is the one of that
length whatever the prompt (the offset is read from the input on the device); a last chunk is right-padded.
Eagerly a chunk cost ~40 ms of kernel launches on top of its work (8B shape, H200), and every decoding
row waited for it. Graphs exist up to ``CHUNK_GRAPH_POSITIONS`` cached positions and a length the block
table reaches; past either a chunk runs eagerly, where its attention outweighs the launches.
"""

from __future__ import annotations

from typing import Any

import torch

LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # the padded prompt lengths with graphs
MAX_TOKENS = 4096  # the largest padded prefill (batch x length) replayed from a graph
CHUNK_GRAPH_POSITIONS = 32768  # chunks of long prompts replay graphs up to this many cached positions


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (max_batch,)


def pack_rows(prompts: list[list[int]], rows: list[int], batch: int, length: int, scratch_row: int) -> torch.Tensor:
    """The prefill input ``[batch, length + 2]`` (long): each prompt right-padded with 0 to ``length``,
    then its cache row and its length; rows past ``len(prompts)`` prefill token 0 into ``scratch_row``."""
    data = [p + [0] * (length - len(p)) + [row, len(p)] for p, row in zip(prompts, rows)]
    data += [[0] * length + [scratch_row, 1]] * (batch - len(prompts))
    return torch.tensor(data, dtype=torch.long)


def run_packed(model: Any, data: torch.Tensor) -> torch.Tensor:
    """Prefill from a ``pack_rows`` input on the device; each row's last-token logits ``[b, vocab]``."""
    t = data.shape[1] - 2
    return model.prefill(data[:, :t], data[:, t], lengths=data[:, t + 1])[:, 0]


def chunk_lengths(chunk: int | None, max_seq_len: int, reach: int) -> list[int]:
    """The cached lengths a chunk of ``chunk`` tokens can end at and have a graph: every multiple of it
    that the block table ``reach``es, up to ``CHUNK_GRAPH_POSITIONS``; none if no prompt is chunked."""
    if chunk is None or chunk >= max_seq_len:
        return []
    return [k * chunk for k in range(1, min(reach, CHUNK_GRAPH_POSITIONS) // chunk + 1)]


def pack_chunk(context: list[int], row: int, start: int, chunk: int) -> torch.Tensor:
    """The input of a chunk ``[1, chunk + 3]`` (long): the context's tokens ``start..start+chunk-1``,
    right-padded with 0, then its cache row, ``start`` and the index of its last real token."""
    tokens = context[start:start + chunk]
    return torch.tensor([tokens + [0] * (chunk - len(tokens)) + [row, start, len(tokens) - 1]], dtype=torch.long)


def run_chunk(model: Any, data: torch.Tensor, kv_len: int) -> torch.Tensor:
    """A chunk from a ``pack_chunk`` input that ends at position ``kv_len - 1``; its last token's logits ``[1, vocab]``."""
    t = data.shape[1] - 3
    return model.prefill_chunk(data[:, :t], data[:, t], data[:, t + 1], kv_len, data[:, t + 2])[:, 0]


class PrefillGraphs:
    """CUDA graphs of ``run_packed`` for every (batch, length) bucket up to ``max_tokens`` padded tokens."""

    def __init__(self, model: Any, max_batch: int, max_seq_len: int, scratch_row: int, device: torch.device,
                 max_tokens: int = MAX_TOKENS, chunk: int | None = None, reach: int = 0) -> None:
        """``chunk``: the chunk size of long prompts (None: no chunk graphs); ``reach``: the positions the
        block table addresses per row (a chunk's graph may not write past them)."""
        self.model, self.scratch_row, self.device, self.chunk = model, scratch_row, device, chunk
        self.shapes = [(b, t) for b in batch_sizes(max_batch) for t in LENGTHS if t <= max_seq_len and b * t <= max_tokens]
        self.chunk_lengths = chunk_lengths(chunk, max_seq_len, reach)
        self.out = torch.empty(max_batch, model.args.vocab_size, dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (batch, length) or (0, kv_len)

    def shape(self, n: int, longest: int) -> tuple[int, int] | None:
        """The smallest graph shape that holds ``n`` prompts of at most ``longest`` tokens, or None."""
        return next(((b, t) for b, t in self.shapes if b >= n and t >= longest), None)

    def run(self, shape: tuple[int, int], host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``host`` (a ``pack_rows`` input of this shape, pinned) into the graph's input and replay it.
        Returns the device copy of the input and the logits ``[b, vocab]`` (a view of the shared output,
        valid until the next replay)."""
        graph, data = self.graphs[shape] if shape in self.graphs else self._capture(shape)
        data.copy_(host, non_blocking=True)
        graph.replay()
        return data, self.out[: shape[0]]

    def has_chunk(self, start: int, kv_len: int) -> bool:
        """Whether a chunk at ``start`` ending at position ``kv_len - 1`` has a graph (its start a multiple
        of the chunk size, its length recorded or recordable)."""
        return kv_len in self.chunk_lengths and start == kv_len - self.chunk

    def run_chunk(self, kv_len: int, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the chunk graph of ``kv_len`` on ``host`` (a ``pack_chunk`` input, pinned): as ``run``."""
        key = (0, kv_len)
        graph, data = self.graphs[key] if key in self.graphs else self._capture(key)
        data.copy_(host, non_blocking=True)
        graph.replay()
        return data, self.out[:1]

    def capture(self) -> None:
        """Record every shape not yet recorded, the largest first (later ones reuse its pool memory)."""
        keys = sorted(self.shapes, key=lambda s: -s[0] * s[1]) + [(0, n) for n in reversed(self.chunk_lengths)]
        for key in keys:
            if key not in self.graphs:
                self._capture(key)

    def _capture(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        b, t = key
        if b:
            data = pack_rows([], [], b, t, self.scratch_row).to(self.device)  # every row on the scratch row

            def run() -> torch.Tensor:
                return run_packed(self.model, data)
        else:  # a chunk ending at position t - 1, on the scratch row
            data = pack_chunk([0] * t, self.scratch_row, t - self.chunk, self.chunk).to(self.device)
            b = 1

            def run() -> torch.Tensor:
                return run_chunk(self.model, data, t)
        side = torch.cuda.Stream(self.device)  # warm up (lazy library init) off the capture, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.out[:b].copy_(run())
        except RuntimeError as err:  # e.g. an op that copies from the host: name the way around it
            raise RuntimeError(f"capturing the prefill CUDA graph {key} failed ({err}); serve --prefill-graph-tokens 0 "
                               "(Engine(prefill_graph_tokens=0)) prefills eagerly") from err
        self.graphs[key] = (graph, data)
        return graph, data
