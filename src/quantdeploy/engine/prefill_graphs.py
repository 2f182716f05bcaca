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
"""

from __future__ import annotations

from typing import Any

import torch

LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # the padded prompt lengths with graphs
MAX_TOKENS = 4096  # the largest padded prefill (batch x length) replayed from a graph


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


class PrefillGraphs:
    """CUDA graphs of ``run_packed`` for every (batch, length) bucket up to ``max_tokens`` padded tokens."""

    def __init__(self, model: Any, max_batch: int, max_seq_len: int, scratch_row: int, device: torch.device,
                 max_tokens: int = MAX_TOKENS) -> None:
        self.model, self.scratch_row, self.device = model, scratch_row, device
        self.shapes = [(b, t) for b in batch_sizes(max_batch) for t in LENGTHS if t <= max_seq_len and b * t <= max_tokens]
        self.out = torch.empty(max_batch, model.args.vocab_size, dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

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

    def capture(self) -> None:
        """Record every shape not yet recorded, the largest first (later ones reuse its pool memory)."""
        for shape in sorted(self.shapes, key=lambda s: -s[0] * s[1]):
            if shape not in self.graphs:
                self._capture(shape)

    def _capture(self, shape: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        b, t = shape
        data = pack_rows([], [], b, t, self.scratch_row).to(self.device)  # every row on the scratch row
        side = torch.cuda.Stream(self.device)  # warm up (lazy library init) off the capture, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run_packed(self.model, data)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.out[:b].copy_(run_packed(self.model, data))
        except RuntimeError as err:  # e.g. an op that copies from the host: name the way around it
            raise RuntimeError(f"capturing the prefill CUDA graph of shape {shape} failed ({err}); "
                               "serve --prefill-graph-tokens 0 (Engine(prefill_graph_tokens=0)) prefills eagerly") from err
        self.graphs[shape] = (graph, data)
        return graph, data
