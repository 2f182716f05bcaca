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

The engine refuses the trees on CUDA: with an engine on the trees and one on its own graphs in one
process, replays fault ("unspecified launch failure" on an H200, every time once the caching allocator
hands freed memory back to the driver between steps; one engine of either kind alone, or two of one
kind, ran clean under the same test).

Capturing needs the step to run first (Inductor compiles, Triton loads its kernels, libraries
initialise), and the capture records without running. Both are safe on live rows: a decode step
writes the keys and values of ``tokens`` at ``positions`` and reads the cache, so running it again on
the same inputs writes the same values to the same slots. ``run`` replays after a capture, so the
step a caller asked for has run exactly as a replay would run it.

The graphs share one memory pool (they never run at once); each graph's logits stay valid until the
next replay of any graph, which is after the sampler has read them (one stream orders both).

``compile_decode`` makes the step itself. Where no graph replays it (on the CPU, or through torch.compile's
own graphs), every call first evaluates Dynamo's guards: thousands of them on the model's modules (a type,
an attribute, the dtype and shape of each of ~250 weights), 1.1-1.3 ms a call for the bundled model
quantized to int4 on 2 CPU cores, a tenth of its batch-1 step; without them 0.06-0.07 ms (the step 1.10x
faster at batch 1, ``benchmarks/compiled_guards_cpu.py``). The engine owns
its model and changes none of it after this point, so those guards are dropped
(``torch.compiler.skip_guard_on_all_nn_modules_unsafe``; the inputs' and globals' guards stay). What makes
that safe is that the graphs of one engine are never offered to another: Dynamo keeps its graphs per code
object, and each engine compiles a copy of ``decode`` with a code object of its own.
"""

from __future__ import annotations

import types
from typing import Callable

import torch


def compile_decode(model: torch.nn.Module, options: dict, backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``model.decode`` compiled (full graph, static shapes, Inductor ``options``) for this model alone,
    without guards on its modules (see the module docstring); ``options`` may name a ``guard_filter_fn``.
    ``backend="eager"``: traced by Dynamo only (tests)."""
    fn = type(model).decode
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, **options}
    if backend != "inductor":  # other backends take no Inductor options
        options = {"guard_filter_fn": options["guard_filter_fn"]}
    return torch.compile(types.MethodType(own, model), fullgraph=True, dynamic=False, backend=backend, options=options)


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
            raise RuntimeError(f"capturing the decode CUDA graph of batch {n} failed ({err}); Engine(compile=False) "
                               "decodes eagerly") from err
        self.graphs[n] = (graph, logits)
