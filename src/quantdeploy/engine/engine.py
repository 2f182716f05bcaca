"""The Engine: prefill, batched decode over a static KV cache, and the generation loop.

Lifecycle of a sequence::

    add(prompt)  → the lowest free row is the sequence's, and KV-cache blocks for its prompt
    step()       → prefill every sequence added since the last step in one padded forward (first tokens
                   sampled on the device; a prompt longer than ``prefill_chunk_tokens`` goes a chunk per
                   step instead, so the rows decoding meanwhile wait one chunk, not the whole prompt),
                   one decode step for every running row (each taking a new
                   cache block when it needs one), then read back the *previous* step's tokens
    ...          → a sequence finishes on EOS / stop id / stop string / max_tokens / context end;
                   its row and blocks are freed at once and the next ``add`` may take them

KV memory is a pool of blocks (``engine/kv_cache.py``, which states the admission and preemption
rules): ``can_admit`` says whether a prompt may be added now; when a running sequence needs a block
and none is free, the newest running sequence is preempted and later prefilled again from its prompt
and output (its tokens, sampled ones included, come out as they would have without the preemption).

The host never waits for the step it just launched: ``step`` launches decode k+1 (its input tokens
stay on the device), and only then reads the tokens of step k, copied to pinned memory behind it.
So the GPU always has the next step queued while Python detokenizes and checks stop strings. The
cost is that a sequence stopped by a stop token/string runs one extra step whose token is dropped;
length limits are known in advance and never overrun. ``add``/``abort`` between steps are how the
server does continuous batching; ``generate``/``stream`` are the simple loops on top.

Decode runs over rows ``0..n-1`` (n rounded up to a bucket) with a fixed shape, which is what
CUDA graphs need: on CUDA the decode step is ``torch.compile``d and replayed from a CUDA graph per
batch bucket (``engine/decode_graphs.py``: one launch a step, no host work inside), and its attention
kernel reads each row's own positions only, the lengths being a device tensor
(``kernels/triton_attention.py``), so a step costs what the sequences hold, not what the cache
reserves; on CPU it runs eagerly (or compiled, with ``compile=True``) and each row attends over its own
cached positions through our C++ kernel (``kernels/cpu_attention.cpp``), or, where that is not built or
the cache is quantized, over the positions of the longest row (compiled: rows in buckets of similar
lengths, ``kernels/paged_attention_cpu.py``).
On CUDA a prefill of up to 4096 padded tokens
replays a CUDA graph of its bucketed shape (``engine/prefill_graphs.py``): eagerly, launching its
kernels took longer than running them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from quantdeploy.device import resolve_device
from quantdeploy.engine.decode_graphs import DecodeGraphs, compile_decode
from quantdeploy.engine.kv_cache import BLOCK_TOKENS, BlockTable, PagedKVCache, choose_decode_attention, pool_blocks
from quantdeploy.engine.loading import LoadedModel, from_bundle, load
from quantdeploy.engine.prefill import Prefill
from quantdeploy.engine.prefill_graphs import MAX_TOKENS, PrefillGraphs
from quantdeploy.engine.sampling import BatchSampler, SamplingParams
from quantdeploy.engine.sequence import Sequence, check_lengths, encode_prompt, eos_ids
from quantdeploy.engine.slots import Slots
from quantdeploy.errors import ConfigError

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RECOMPILE_LIMIT = 1024  # graphs of the decode step a process may compile (see Engine._run_decode)
# Inductor options of the decode step. No "triton.cudagraphs" (torch.compile's own graphs, cudagraph trees):
# the engine captures its own (engine/decode_graphs.py), and refuses the trees on CUDA: an engine on the trees
# and one on its own graphs in one process fault on replay (H200, "unspecified launch failure", every time
# once cached memory is handed back between steps). Coordinate-descent tuning (gpt-fast's choice) is off:
# with it on, Inductor rewrites every one-row matmul as a multiply + reduction of its own; on an H200 those
# read the weights at 77% of the copy bandwidth where cuBLAS alone reaches 89%, and batch-1 decode of the
# 8B shape took 5.01-5.04 ms a step against 4.77 without it (twice, at 71a5691; compiles 77 s vs 30 s;
# benchmarks/results/decode-profile-h200.txt). An older H100 run (7d30d7b) had it 4% ahead.
COMPILE_OPTIONS: dict = {}
# A longer prompt is prefilled a chunk per step. On the 8B shape (H200, chunks replayed from CUDA graphs) a
# step with a chunk of 2,048 took 63-91 ms at 8k context, one of 512 21-33 ms, but a prompt's prefill then
# costs 35% more steps' time in all: under a mixed serve load the slowest short request's mean inter-token
# latency was 2.39x alone's with 512 against 1.84x with 2,048 (eager then), a 32k prompt's first token 2.39 s
# against 1.86 s, and 64 graphs instead of 16 took 50 s to capture (results/chunked-prefill-graphs-h200.txt,
# serve-mixed-long-prompts-llama8b-shape-h200.txt).
PREFILL_CHUNK_TOKENS = 2048


@dataclasses.dataclass
class Counters:
    """What the engine has done since it started (host-side counts, no device sync)."""

    prefill_batches: int = 0
    prefill_sequences: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sequences advanced, summed over decode steps (rows / steps = mean batch)
    preemptions: int = 0  # sequences whose blocks were taken back to let older ones grow
    device_wait_seconds: float = 0.0  # the host blocked on a step's tokens: the device was the one busy


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length
    prompt_tokens: int


class Engine(Prefill):
    """A loaded model, its KV cache and sampler, and the sequences running on them."""

    def __init__(self, loaded: LoadedModel, device: torch.device, max_batch: int = 8,
                 max_seq_len: int | None = None, compile: bool | None = None,
                 compile_options: dict | None = None, decode_attention: str | None = None,
                 buckets: tuple[int, ...] | None = None, max_prefill_tokens: int = 8192,
                 prefill_graph_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 prefill_chunk_tokens: int | None = PREFILL_CHUNK_TOKENS) -> None:
        """``compile``: torch.compile the decode step with CUDA graphs (default: on CUDA only).
        ``compile_options``: inductor options for it (default ``COMPILE_OPTIONS``). ``decode_attention``:
        "split_kv" (the cache's ``attend``: each row reads only its own positions, ``kernels/triton_attention.py``
        on CUDA, ``kernels/cpu_attention.cpp`` on the CPU; the default on CUDA with triton and on the CPU
        where our kernel serves the cache, else compiled on the CPU past ``kv_cache.CPU_REDUCE_MAX_POSITIONS``
        positions a row), "reduce" (``models.llama.reduce_attention`` over ``kv_len`` positions under a mask;
        the default compiled on the CPU up to that many, without our kernel) or "sdpa" (the default otherwise).
        ``buckets``: the batch sizes a decode step is padded to (default ``BUCKETS``); each is one
        compiled graph, so a server that must not stall on compiles mid-load can ask for one, e.g. (64,).
        ``max_prefill_tokens``: the most (padded) prompt tokens one prefill forward takes; sequences added
        between two steps are prefilled together up to it (a longer prompt goes alone).
        ``prefill_graph_tokens``: prefills of up to this many padded tokens, and chunks of long prompts,
        replay CUDA graphs (``engine/prefill_graphs.py``; default 4096 on CUDA; 0 runs every prefill eagerly).
        ``kv_cache_tokens``: the positions the KV-cache pool holds, over all sequences (default: enough for
        every row at ``max_seq_len``, and on CUDA at most what fits in ``kv_cache.KV_MEMORY_FRACTION`` of
        the free memory; at least one sequence of ``max_seq_len``).
        ``prefill_chunk_tokens``: a prompt longer than this is prefilled in chunks of it, one chunk per step,
        while the other rows go on decoding (None: whole prompts only)."""
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = device
        args = self.model.args
        self.max_seq_len = min(max_seq_len or 2048, args.max_seq_len)
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if device.type == "cuda" and (compile_options or {}).get("triton.cudagraphs"):
            raise ConfigError("compile_options 'triton.cudagraphs' (torch.compile's CUDA graph trees) is not supported "
                              "on CUDA: the engine captures its own decode graphs; drop the option")
        self.max_batch = max_batch
        self.buckets = tuple(sorted(b for b in (buckets or BUCKETS) if b < max_batch)) + (max_batch,)
        dtype = self.model.norm.weight.dtype
        kv = loaded.kv_cache_dtype
        self.scratch_row = max_batch  # one cache row past the sequences' rows: padding rows of a prefill write here
        per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * (1 if kv else dtype.itemsize)
        self.table = BlockTable(max_batch + 1, self.max_seq_len, 1 + pool_blocks(
            kv_cache_tokens, max_batch, self.max_seq_len, per_token, device), device)  # + the scratch row
        self.slots = Slots(max_batch, self.table)
        self.kv_cache_bytes = (self.table.n_blocks * BLOCK_TOKENS) * per_token
        self.model.attach_cache(lambda i, attn: PagedKVCache(
            self.table, args.n_kv_heads, args.head_dim, dtype, device, kv, attn.k_scale, attn.v_scale))
        self.sampler = BatchSampler(max_batch, args.vocab_size, device)
        self.next_token = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.growing = torch.zeros(max_batch, dtype=torch.long, device=device)  # 1 where a row advances
        self.eos_ids = eos_ids(loaded.tokenizer, loaded.hf_config)
        self._pending: list[tuple[Any, Any, list[tuple[int, Sequence]]]] = []  # (host tokens, event, launched)
        self._unfilled: list[Sequence] = []  # added (or resumed), not yet prefilled
        self._chunking: list[Sequence] = []  # long prompts being prefilled a chunk per step, oldest first
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.counters = Counters()
        self.max_prefill_tokens = max_prefill_tokens
        self._next_id = 0
        self.compiled = (device.type == "cuda") if compile is None else compile
        self._compiled_buckets: set[int] = set()
        self._decode = self.model.decode
        attention = choose_decode_attention(decode_attention, device, self.compiled, self.max_seq_len,
                                            self.model.layers[0].attention.kv_cache.native)
        log.debug("decode attention: %s", attention)
        for layer in self.model.layers:
            layer.attention.decode_attention = attention
        graph_tokens = (MAX_TOKENS if device.type == "cuda" else 0) if prefill_graph_tokens is None else prefill_graph_tokens
        self.prefill_graphs = (PrefillGraphs(self.model, max_batch, self.max_seq_len, self.scratch_row, device, graph_tokens,
                                             prefill_chunk_tokens, self.table.host.shape[1] * BLOCK_TOKENS)
                               if graph_tokens else None)
        self.decode_graphs = None
        if self.compiled:  # options, not mode=: inductor's global config is left alone
            options = COMPILE_OPTIONS if compile_options is None else compile_options
            self._decode = compile_decode(self.model, options)
            if device.type == "cuda":
                self.decode_graphs = DecodeGraphs(self._decode, self.next_token, self.positions, self.max_seq_len)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             backend: str = "auto", **kwargs: Any) -> "Engine":
        """Load a quantdeploy checkpoint, HF folder, GGUF file, hub name or ``bundled`` onto ``device``;
        ``backend`` picks the quantized kernels (``kernels.BACKENDS``), ``kwargs`` go to the constructor."""
        device = resolve_device(device)
        return cls(load(path, device, dtype, backend=backend), device, **kwargs)

    @classmethod
    def from_bundle(cls, bundle: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    backend: str = "auto", **kwargs: Any) -> "Engine":
        device = resolve_device(device)
        return cls(from_bundle(bundle, device, dtype, backend), device, **kwargs)

    # ------------------------------------------------------------------ the batching API
    @property
    def running(self) -> list[Sequence]:
        """The sequences in progress: in a row, or preempted and waiting to resume."""
        return self.slots.running

    @property
    def free_rows(self) -> int:
        return self.slots.free_rows

    @property
    def kv_usage(self) -> float:
        """The fraction of the KV-cache pool's blocks that sequences hold."""
        return self.slots.usage

    def can_admit(self, n_prompt: int) -> bool:
        """Whether ``add`` may take a prompt of ``n_prompt`` tokens now: a row is free, no preempted sequence
        waits, and the free blocks cover the prompt plus one token with a block to spare per running row."""
        return self.slots.can_admit(n_prompt)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def check(self, n_prompt: int, params: SamplingParams) -> None:
        """Raise RequestError if a prompt of ``n_prompt`` tokens with ``params`` cannot fit the context."""
        check_lengths(self.max_seq_len, n_prompt, params)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Record the prefill CUDA graphs and compile the decode step of every bucket now, so that no request
        waits on a compile or a capture (a server calls this before it reports ready); otherwise each is
        made when first used. The decode runs on empty rows at position 0, which a prefill overwrites."""
        if self.running:
            raise RuntimeError("warm_up runs before any sequence is added")
        start = time.perf_counter()
        if self.prefill_graphs is not None:
            self.prefill_graphs.capture()
        if self.compiled:
            self.next_token.zero_()
            self.positions.zero_()
            for n in self.buckets:
                self._run_decode(n, self.max_seq_len)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        log.info("warmed up in %.1f s (decode compiled for batch sizes %s)", time.perf_counter() - start,
                 list(self.buckets) if self.compiled else "none: eager")

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Give a new sequence the lowest free row. The next ``step`` prefills it, together with every other
        sequence added since the last step, and reports its first token."""
        self.check(len(prompt_ids), params)
        if not self.can_admit(len(prompt_ids)):
            raise RuntimeError("no free row or KV-cache blocks: check can_admit before add (the server queues instead)")
        seq = Sequence(self._next_id, -1, list(prompt_ids), params, self.tokenizer, self._stop_ids(params))
        self._next_id += 1
        self._place(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (client gone); its row is free for the next ``add``."""
        if not seq.finished:
            seq.finish("abort")
        for queue in (self._unfilled, self._chunking):
            if seq in queue:
                queue.remove(seq)
        self.slots.forget(seq)
        self._free(seq)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Prefill the sequences added since the last step, launch one decode step for every row that may
        still grow, then read back the previous one. Returns the sequences that received tokens or failed
        (check ``seq.finished``)."""
        self._resume()
        failed = self._prefill_added()
        launch = []
        for row, seq in enumerate(self.slots.rows):
            if seq is None or seq in self._chunking:  # a row mid-prefill: its position is the next chunk's start
                continue
            if self._may_grow(seq):
                launch.append((row, seq))
            elif not seq.parked:
                self._park(row)
                seq.parked = True
        launch, preempted = self.slots.grow(launch)
        for row, seq in preempted:
            log.info("KV cache full: preempting sequence %d (%d tokens) to recompute later", seq.id, seq.context_len)
            self._vacate(row)
            self.counters.preemptions += 1
        if launch:
            self.table.sync()
            n = next(b for b in self.buckets if b > launch[-1][0])
            kv_len = self.max_seq_len if self.compiled else self._kv_len(launch)
            logits = self._run_decode(n, kv_len)
            tokens = self.sampler.sample(logits, slice(0, n))
            self.next_token[:n] = tokens.clamp(min=0)  # -1 marks a row with non-finite logits
            self.positions[:n] += self.growing[:n]
            for _, seq in launch:
                seq.launched += 1
            self._push(tokens, launch)
            self.counters.decode_steps += 1
            self.counters.decode_rows += len(launch)
        return failed + self._resolve(keep_last=bool(launch))

    # ------------------------------------------------------------------ simple loops
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]], params: SamplingParams | None = None,
                 chat: bool = False) -> Any:
        """Complete one prompt (text or token ids → Completion) or several (→ list), batched up to
        ``max_batch`` at a time."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        encoded = [p if isinstance(p, list) else self.encode(p, chat) for p in ([prompts] if single else prompts)]
        for ids in encoded:
            self.check(len(ids), params)
        waiting = list(enumerate(encoded))
        done: dict[int, Completion] = {}
        active: dict[int, Sequence] = {}
        while waiting or active:
            while waiting and self.can_admit(len(waiting[0][1])):
                i, ids = waiting.pop(0)
                active[i] = self.add(ids, params)
            self.step()
            for i, seq in list(active.items()):
                if seq.finished:
                    done[i] = Completion(seq.text, seq.output_ids, seq.finish_reason, len(seq.prompt_ids))
                    del active[i]
        results = [done[i] for i in range(len(encoded))]
        return results[0] if single else results

    def stream(self, prompt: str, params: SamplingParams | None = None, chat: bool = False) -> Iterator[str]:
        """Yield the completion of ``prompt`` as text pieces; they join to ``generate``'s text."""
        seq = self.add(self.encode(prompt, chat), params or SamplingParams())
        try:
            while not seq.finished:
                self.step()
                piece = seq.take_text()
                if piece:
                    yield piece
        finally:
            if not seq.finished:
                self.abort(seq)

    # ------------------------------------------------------------------ internals
    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

    def _may_grow(self, seq: Sequence) -> bool:
        """Whether another decode step may run for ``seq``: its token budget and the context both have room."""
        return not seq.finished and seq.launched < seq.params.max_tokens and seq.feed_position < self.max_seq_len

    def _place(self, seq: Sequence) -> None:
        """Give ``seq`` a row and blocks (``slots.place``); the next step prefills it."""
        self.slots.place(seq)
        seq.parked, seq.prefilled = False, 0
        self._unfilled.append(seq)

    def _resume(self) -> None:
        """Place preempted sequences again, oldest first, as rows, blocks and their read-back tokens allow."""
        while (seq := self.slots.next_to_resume()) is not None:
            self._place(seq)

    def _run_decode(self, n: int, kv_len: int) -> torch.Tensor:
        """The decode step over rows ``0..n-1``. Compiled, each bucket is a graph of its own, compiled at the
        bucket's first call. Dynamo counts the graphs of one code object (each engine's own decode,
        ``compile_decode``) against a recompile limit (8 by default, fewer than ``BUCKETS``), and a
        full-graph compile past it fails: the calls that are meant to compile a new graph run under
        a high limit, every other call under the process's own."""
        graphs = self.decode_graphs
        if graphs is not None and n in graphs.graphs:
            return graphs.run(n)
        tokens, positions = self.next_token[:n].clone(), self.positions[:n].clone()
        if not self.compiled:
            return self._decode(tokens, positions, kv_len)
        if graphs is None and n in self._compiled_buckets:
            return self._decode(tokens, positions, kv_len)
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            logits = self._decode(tokens, positions, kv_len) if graphs is None else graphs.run(n)
        self._compiled_buckets.add(n)
        return logits

    def _kv_len(self, launch: list[tuple[int, Sequence]]) -> int:
        longest = max(len(s.prompt_ids) + s.launched for _, s in launch)
        return min(self.max_seq_len, -(-longest // 64) * 64)

    def _push(self, tokens: torch.Tensor, launched: list[tuple[int, Sequence]]) -> None:
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event, launched))
        else:
            self._pending.append((tokens, None, launched))

    def _resolve(self, keep_last: bool) -> list[Sequence]:
        """Read back every pending step except (with ``keep_last``) the one just launched."""
        ready, self._pending = (self._pending[:-1], self._pending[-1:]) if keep_last else (self._pending, [])
        touched: list[Sequence] = []
        for host, event, launched in ready:
            if event is not None:
                started = time.perf_counter()
                event.synchronize()  # an older step: the device has already moved on to the next one
                self.counters.device_wait_seconds += time.perf_counter() - started
            values = host.tolist()
            for index, seq in launched:
                if seq.finished:
                    continue  # launched before its stop was seen: the token is dropped
                seq.receive(values[index], context_full=len(seq.prompt_ids) + seq.received >= self.max_seq_len)
                touched.append(seq)
                if seq.finished:
                    self._free(seq)
        return touched

    def _park(self, row: int) -> None:
        """No more steps for this row: decode may still sweep it, so keep its writes at position 0."""
        self.positions[row] = 0
        self.growing[row] = 0

    def _free(self, seq: Sequence) -> None:
        """Take back ``seq``'s row and blocks, if it holds them; a failed sequence's blocks are zeroed first
        (its non-finite values would leak into the next owner's masked positions: 0 × NaN is NaN)."""
        if not self.slots.holds(seq):
            return
        blocks = self.slots.release(seq)
        if seq.finish_reason == "error" and blocks:
            for layer in self.model.layers:
                layer.attention.kv_cache.zero_blocks(blocks)
        self._vacate(seq.row)

    def _vacate(self, row: int) -> None:
        """The device side of a row left empty: parked, its sampling state released."""
        self._park(row)
        self.sampler.release(row)
