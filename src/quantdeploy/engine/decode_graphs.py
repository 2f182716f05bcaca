"""The compiled decode step replayed from CUDA graphs of our own, one per batch bucket.

Why not torch.compile's own CUDA graphs (``mode="reduce-overhead"``, cudagraph trees): every call
through them goes through Dynamo's guards and the trees' bookkeeping on the host (input checks, copies
of the inputs into the graph's static buffers, output liveness) before the replay is launched. When
a step's device time is short, a quantized model at batch 1 say, the host becomes the bound: on an
H200 at the 8B shape the W4A16 step left the GPU idle ~0.2 ms between steps
(``benchmarks/results/decode-profile-h200.txt``). Here the step is compiled by Inductor without CUDA
graphs and captured once per bucket with ``torch.cuda.CUDAGraph``; a step is then one
``replay()``, whose inputs are the engine's persistent token and position buffers themselves (read by
the graph at replay, so nothing is copied) and whose logits land in the graph's own output.

Capturing needs the step to run first (Inductor compiles, Triton loads its kernels, libraries
initialise), and the capture records without running. Both are safe on live rows: a decode step
writes the keys and values of ``tokens`` at ``positions`` and reads the cache, so running it again on
the same inputs writes the same values to the same slots. ``run`` replays after a capture, so the
step a caller asked for has run exactly as a replay would run it.

The graphs share one memory pool (they never run at once); each graph's logits stay valid until the
next replay of any graph, which is after the sampler has read them (one stream orders both).
"""

from __future__ import annotations

from typing import Callable

import torch


class DecodeGraphs:
    """CUDA graphs of ``step(tokens[:n], positions[:n], kv_len)`` for each batch bucket ``n``."""

    def __init__(self, step: Callable[..., torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor,
                 kv_len: int) -> None:
        self.step, self.tokens, self.positions, self.kv_len = step, tokens, positions, kv_len
        self.device = tokens.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, n: int) -> torch.Tensor:
        """Replay bucket ``n``'s graph (capturing it first if needed): logits ``[n, vocab]``, valid until
        the next replay."""
        if n not in self.graphs:
            self._capture(n)
        graph, logits = self.graphs[n]
        graph.replay()
        return logits

    def _capture(self, n: int) -> None:
        tokens, positions = self.tokens[:n], self.positions[:n]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # compile and warm up off the capture stream, as CUDA graphs need
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(tokens, positions, self.kv_len)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.step(tokens, positions, self.kv_len)
        except RuntimeError as err:
            raise RuntimeError(f"capturing the decode CUDA graph of batch {n} failed ({err}); Engine(compile_options="
                               "{'triton.cudagraphs': True}) uses torch.compile's own graphs instead") from err
        self.graphs[n] = (graph, logits)
