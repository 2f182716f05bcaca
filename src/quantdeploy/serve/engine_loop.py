"""The engine side of the server: one loop that owns the Engine, takes commands and sends event batches.

Between two decode steps the loop takes the commands that arrived, drops cancelled requests (a client
that went away frees its row at once), admits waiting requests into free rows (the next step prefills
them together) and runs one ``engine.step()``; then it sends that step's events as one batch. Each
request keeps its own sampling parameters and stop conditions: they live on its engine sequence.

When to admit: a prefill is one forward that every decoding row waits for, so admitting each arrival
at once, under load, turns into many small prefills. On a GPU a small prefill replays a CUDA graph
(``engine/prefill_graphs.py``) and costs about one decode step (8.6 ms for four 32-token prompts on
the 8B shape, H200); eagerly it cost 22-43 ms, all of it launch overhead. While rows are decoding,
the loop gathers new requests until they fill every free row or the oldest has waited
``prefill_wait_steps`` decode steps, then prefills them together; an idle engine admits at once. This
is TGI's ``max_waiting_tokens`` rule (vLLM's ``scheduler_delay_factor`` is the same idea in seconds).
The default, 0, admits at once: under the closed-loop benchmark (64 clients, equal lengths) waiting
bought nothing; bursty open-loop traffic is where it may.

The loop runs in a thread of the server process (``EngineThread``) or in a process of its own
(``EngineProcess``). Both sides are Python-bound under load: the HTTP side spends tens of µs of
interpreter time per streamed token, the loop a few ms per step at 64 rows, and in one process they
share one interpreter lock. On a GPU the loop gets a process of its own, as vLLM's V1 engine core does,
which also keeps a crashed engine from taking the HTTP side with it; there (H200, 8B shape, 64 streams)
the HTTP process used 17-20% of a core and the server reached 92% of the offline engine's throughput,
see ``benchmarks/results/serve-gpu-llama8b-shape-h200.txt``. On a CPU the engine's compute threads
already use every core, and a thread is enough. Both speak the same messages, plain tuples that
pickle cheaply:

- commands: ``("submit", rid, prompt_ids, params)``, ``("cancel", rid)``, ``("stop",)``;
- events: ``("admitted", rid)``, ``("delta", rid, text, n_tokens)``,
  ``("done", rid, finish_reason, n_prompt, n_output)``, ``("error", rid, message)``; every batch ends
  with ``("stats", running, kv_usage, gpu_bytes, counts, step_seconds)``, ``counts`` the engine's
  ``Counters`` and the loop's idle seconds added since the last batch, ``step_seconds`` the wall time of
  each loop turn that ran an engine step since then (admission, prefill, decode, detokenization).

``stop`` cancels whatever is still waiting or running (``done`` with reason ``abort``), sends
``[("stopped",)]`` and ends the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import multiprocessing
import queue
import threading
import time
from typing import Any, Callable

import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.engine.sequence import Sequence, check_lengths, encode_prompt
from quantdeploy.errors import QuantDeployError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs of the engine: its tokenizer and limits (sent once, at startup)."""

    tokenizer: Any
    max_seq_len: int
    max_batch: int

    @classmethod
    def of(cls, engine: Engine) -> "EngineInfo":
        return cls(engine.tokenizer, engine.max_seq_len, engine.max_batch)

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def check(self, n_prompt: int, params: SamplingParams) -> None:
        check_lengths(self.max_seq_len, n_prompt, params)


PREFILL_WAIT_STEPS = 0  # measured on an H200 at 64 streams: 4 did not cut the prefills (11 either way), cost 8% more steps


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """How an engine process builds its engine: ``Engine.load(path, device, **options)``."""

    path: str
    device: str | None = None
    options: dict = dataclasses.field(default_factory=dict)


class EngineLoop:
    def __init__(self, engine: Engine, send: Callable[[list], None], prefill_wait_steps: int = PREFILL_WAIT_STEPS) -> None:
        self.engine, self.send, self.prefill_wait_steps = engine, send, prefill_wait_steps
        self.waiting: collections.deque[tuple[str, list[int], SamplingParams, int]] = collections.deque()
        self.running: dict[int, tuple[str, Sequence]] = {}  # engine sequence id → (request id, sequence)
        self.sent: dict[int, int] = {}  # engine sequence id → tokens already reported
        self.events: list[tuple] = []
        self.steps = 0  # engine steps run, the clock of prefill_wait_steps
        self.idle_seconds = 0.0  # time spent with nothing to run, waiting for requests
        self._counted: dict[str, float] = {}  # the counts already sent
        self._step_seconds: list[float] = []  # loop turns that ran a step, since the last batch

    def run(self, receive: Callable[[float], list]) -> None:
        """Loop until a ``stop`` command; ``receive(timeout)`` returns the commands that arrived."""
        while True:
            idle = not self.running and not self.waiting
            stop = False
            started = time.perf_counter()
            commands = receive(0.05 if idle else 0.0)
            if idle:
                self.idle_seconds += time.perf_counter() - started
            for command in commands:
                if command[0] == "submit":
                    self.waiting.append((*command[1:], self.steps))
                elif command[0] == "cancel":
                    self._cancel(command[1])
                else:
                    stop = True
            if stop:
                self._cancel_all()
                self._flush()
                self.send([("stopped",)])
                return
            turn = time.perf_counter()
            self._admit()
            if self.engine.running:
                self.steps += 1
                try:
                    touched = self.engine.step()
                except Exception as err:  # one bad step fails its batch, never the server
                    log.exception("decode step failed")
                    for seq_id in list(self.running):
                        self._finish_error(seq_id, f"decode step failed: {type(err).__name__}")
                else:
                    for seq in touched:
                        if seq.id in self.running:
                            self._deliver(seq)
                self._step_seconds.append(time.perf_counter() - turn)
            self._flush()

    def _admit(self) -> None:
        free = self.engine.free_rows
        if (self.waiting and self.engine.running and len(self.waiting) < free
                and self.steps - self.waiting[0][3] < self.prefill_wait_steps):
            return  # gather more arrivals for one prefill
        while self.waiting and self.engine.can_admit(len(self.waiting[0][1])):  # in arrival order
            rid, prompt_ids, params, _ = self.waiting.popleft()
            try:
                seq = self.engine.add(prompt_ids, params)
            except Exception as err:  # the HTTP side checked the lengths; anything else fails this request
                log.exception("admitting a request failed")
                self.events.append(("error", rid, f"{type(err).__name__}: {err}"))
                continue
            self.running[seq.id] = (rid, seq)
            self.sent[seq.id] = 0
            self.events.append(("admitted", rid))

    def _deliver(self, seq: Sequence) -> None:
        rid = self.running[seq.id][0]
        new = len(seq.output_ids) - self.sent[seq.id]
        self.sent[seq.id] += new
        piece = seq.take_text()
        if piece or new:
            self.events.append(("delta", rid, piece, new))
        if seq.finished:
            if seq.finish_reason == "error":
                self._finish_error(seq.id, seq.error or "the request failed")
                return
            del self.running[seq.id], self.sent[seq.id]
            self.events.append(("done", rid, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids)))

    def _finish_error(self, seq_id: int, message: str) -> None:
        rid, seq = self.running.pop(seq_id)
        self.sent.pop(seq_id, None)
        self.engine.abort(seq)
        self.events.append(("error", rid, message))

    def _cancel(self, rid: str) -> None:
        for item in self.waiting:
            if item[0] == rid:
                self.waiting.remove(item)
                self.events.append(("done", rid, "abort", len(item[1]), 0))
                return
        for seq_id, (running_rid, seq) in list(self.running.items()):
            if running_rid == rid:
                self.engine.abort(seq)
                del self.running[seq_id], self.sent[seq_id]
                self.events.append(("done", rid, "abort", len(seq.prompt_ids), len(seq.output_ids)))
                return

    def _cancel_all(self) -> None:
        for rid in [item[0] for item in self.waiting] + [rid for rid, _ in self.running.values()]:
            self._cancel(rid)

    def _flush(self) -> None:
        if not self.events:
            return
        engine = self.engine
        gpu = torch.cuda.memory_allocated(engine.device) if engine.device.type == "cuda" else 0
        now = {**dataclasses.asdict(engine.counters), "idle_seconds": self.idle_seconds}
        counts = {k: v - self._counted.get(k, 0) for k, v in now.items()}
        self._counted = now
        self.events.append(("stats", len(engine.running), engine.kv_usage, gpu, counts, self._step_seconds))
        self._step_seconds = []
        batch, self.events = self.events, []
        self.send(batch)


class EngineThread:
    """The loop in a thread of this process; ``deliver(batch)`` is called from that thread."""

    def __init__(self, engine: Engine, deliver: Callable[[list], None], prefill_wait_steps: int = PREFILL_WAIT_STEPS) -> None:
        engine.warm_up()  # before the server reports ready: no request waits on a compile or a capture
        freeze_heap()
        self.info = EngineInfo.of(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=EngineLoop(engine, deliver, prefill_wait_steps).run, args=(self._receive,),
                                        name="quantdeploy-engine", daemon=True)
        self._thread.start()

    def send(self, command: tuple) -> None:
        self._commands.put(command)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _receive(self, timeout: float) -> list:
        out = []
        try:
            out.append(self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait())
            while True:
                out.append(self._commands.get_nowait())
        except queue.Empty:
            return out


def freeze_heap() -> None:
    """Collect once, then move every object alive after loading and warm-up out of the cyclic collector's
    reach (``gc.freeze``, as vLLM does after startup): new objects are collected as before. In a process
    that has imported torch, transformers and the server, a full collection walks ~400k objects: 240-260 ms
    on a 2-core EPYC, during which no stream moves. Under a mixed load on the GPU every stream saw single
    gaps of ~250-290 ms while no engine step took over 200 ms (``quantdeploy_engine_step_seconds``;
    ``results/serve-mixed-long-prompts-llama8b-shape-h200.txt``, Run E): pauses outside the engine loop,
    of that size. Called in the engine's process and in the HTTP process; not yet measured on the GPU
    with both."""
    gc.collect()
    gc.freeze()


def _process_main(conn: Any, spec: EngineSpec, prefill_wait_steps: int) -> None:
    """The engine process: load, report ready (or why not), then run the loop until stop or EOF."""
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # this process is ours, as the CLI's is: a load failure is our one line
    hf_logging.disable_progress_bar()
    try:
        engine = Engine.load(spec.path, spec.device, **spec.options)
        engine.warm_up()
        freeze_heap()
    except Exception as err:
        conn.send(("failed", str(err) if isinstance(err, QuantDeployError) else f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", EngineInfo.of(engine)))

    def receive(timeout: float) -> list:
        out = []
        try:
            if conn.poll(timeout):
                out.append(conn.recv())
                while conn.poll():
                    out.append(conn.recv())
        except (EOFError, OSError):  # the server process is gone
            out.append(("stop",))
        return out

    def send(batch: list) -> None:
        try:
            conn.send(batch)
        except (BrokenPipeError, OSError):
            pass  # the server process is gone; the next receive sees EOF and stops

    EngineLoop(engine, send, prefill_wait_steps).run(receive)


class EngineLoadError(QuantDeployError):
    """The engine process could not load the model; the message is the one the process reported."""


class EngineProcess:
    """The loop in a spawned process. ``start`` blocks until the engine is loaded and returns its info;
    then the event loop ``loop`` reads event batches off the pipe and calls ``deliver(batch)``, and
    ``on_exit(message)`` if the process dies."""

    def __init__(self, spec: EngineSpec, prefill_wait_steps: int = PREFILL_WAIT_STEPS) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_process_main, args=(child, spec, prefill_wait_steps),
                                    name="quantdeploy-engine", daemon=True)
        self._child = child
        self._lock = threading.Lock()
        self.info: EngineInfo | None = None

    def start(self, loop: Any, deliver: Callable[[list], None], on_exit: Callable[[str], None]) -> EngineInfo:
        self._process.start()
        self._child.close()
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode})") from None
        if kind == "failed":
            raise EngineLoadError(payload)
        self.info = payload
        fd = self._conn.fileno()

        def readable() -> None:
            try:
                while self._conn.poll():
                    deliver(self._conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(fd)
                on_exit(f"the engine process exited (exit code {self._process.exitcode})")

        loop.call_soon_threadsafe(loop.add_reader, fd, readable)
        return self.info

    def send(self, command: tuple) -> None:
        with self._lock:
            try:
                self._conn.send(command)
            except (BrokenPipeError, OSError):
                pass  # the process is gone: on_exit has failed or will fail its requests

    def join(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
