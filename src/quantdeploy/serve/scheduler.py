"""Continuous batching: one engine loop, in a thread of its own, between the HTTP handlers and the engine.

Handlers ``submit`` requests into a bounded waiting queue (full → ``QueueFull``, which the app answers
with 429) and read their events from an ``asyncio.Queue``. The loop, between two decode steps,
retires finished sequences, drops cancelled ones (a client that went away frees its row at once),
admits waiting requests into free rows (prefill) and runs one ``engine.step()`` for the whole batch.
Each request keeps its own sampling parameters and stop conditions: they live on its engine sequence.

A failure inside one request (its prefill raises, or its logits turn non-finite) fails that request
alone; a failing decode step fails the requests in that batch and the loop carries on. ``drain``
stops admitting, lets running requests finish until a deadline, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.engine.sequence import Sequence
from quantdeploy.serve.metrics import Metrics

log = logging.getLogger(__name__)


def _dispatch(items: list[tuple[asyncio.Queue, dict]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class QueueFull(Exception):
    """The waiting queue is at its bound: answer 429 and let the client retry."""


class ShuttingDown(Exception):
    """The server no longer admits requests."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    cancelled: bool = False
    sent_tokens: int = 0
    last_token_at: float | None = None
    outbox: list = dataclasses.field(default_factory=list)  # the scheduler's, shared by all its requests

    def emit(self, kind: str, **data: Any) -> None:
        """Queue an event for the request's handler (the engine thread flushes them once per step)."""
        self.outbox.append((self, {"kind": kind, **data}))


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics) -> None:
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # engine sequence id → request
        self._lock = threading.Lock()
        self._outbox: list[tuple[Request, dict]] = []  # events of this loop iteration, handed over at once
        self._wake = threading.Event()
        self._admitting = True
        self._prefilling = False  # a request between the waiting queue and the running batch
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="quantdeploy-engine", daemon=True)

    # ------------------------------------------------------------------ handler side
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request (after ``engine.check`` has accepted its lengths)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._admitting:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            request = Request(prompt_ids, params, loop, asyncio.Queue(), outbox=self._outbox)
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._wake.set()

    @property
    def load(self) -> tuple[int, int]:
        return len(self._running), len(self._waiting)

    def drain(self, deadline_s: float) -> None:
        """Stop admitting; wait up to ``deadline_s`` for in-flight requests, then cancel the rest."""
        with self._lock:
            self._admitting = False
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and (self._running or self._waiting or self._prefilling):
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=60)
        # The engine thread is gone: whatever did not finish in time is cancelled from here.
        for request in [*self._waiting, *self._running.values()]:
            if request.seq is not None:
                self.engine.abort(request.seq)
            self.metrics.requests.labels("cancelled").inc()
            request.emit("done", finish_reason="abort")
        self._waiting.clear()
        self._running.clear()
        self._flush()

    # ------------------------------------------------------------------ engine thread
    def _flush(self) -> None:
        """Hand this iteration's events to the event loop(s) in one wake-up each, not one per token."""
        if not self._outbox:
            return
        batch, self._outbox[:] = list(self._outbox), []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, event in batch:
            by_loop.setdefault(request.loop, []).append((request.events, event))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_dispatch, items)

    def _loop(self) -> None:
        while not self._stop:
            self._flush()
            self._drop_cancelled()
            self._admit()
            self._update_gauges()
            if not self.engine.running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                touched = self.engine.step()
            except Exception as err:  # one bad step fails its batch, never the server
                log.exception("decode step failed")
                for request in list(self._running.values()):
                    self._fail(request, f"decode step failed: {type(err).__name__}")
                continue
            for seq in touched:
                request = self._running.get(seq.id)
                if request is not None:
                    self._deliver(request)
            self._flush()
            self._update_gauges()
        self._flush()

    def _drop_cancelled(self) -> None:
        with self._lock:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                request.emit("done", finish_reason="abort")
        for request in [r for r in self._running.values() if r.cancelled]:
            self.engine.abort(request.seq)
            del self._running[request.seq.id]
            self.metrics.requests.labels("cancelled").inc()
            request.emit("done", finish_reason="abort")

    def _admit(self) -> None:
        while self.engine.free_rows:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
                self._prefilling = True
                self.metrics.waiting.set(len(self._waiting))
            self.metrics.queue_time.observe(time.perf_counter() - request.arrived)
            try:
                request.seq = self.engine.add(request.prompt_ids, request.params)
            except Exception as err:
                log.exception("prefill failed")
                self._prefilling = False
                self.metrics.requests.labels("error").inc()
                request.emit("error", message=f"prefill failed: {type(err).__name__}: {err}")
                continue
            self._running[request.seq.id] = request
            self._prefilling = False
            self.metrics.prompt.inc(len(request.prompt_ids))

    def _deliver(self, request: Request) -> None:
        seq = request.seq
        now = time.perf_counter()
        new = len(seq.output_ids) - request.sent_tokens
        if new > 0:
            if request.sent_tokens == 0:
                self.metrics.ttft.observe(now - request.arrived)
            elif request.last_token_at is not None:
                self.metrics.itl.observe((now - request.last_token_at) / new)
            request.sent_tokens += new
            request.last_token_at = now
            self.metrics.generated.inc(new)
        piece = seq.take_text()
        if piece or new:
            request.emit("delta", text=piece, tokens=new)
        if seq.finished:
            del self._running[seq.id]
            if seq.finish_reason == "error":
                self._fail(request, seq.error or "the request failed", running=False)
                return
            self.metrics.e2e.observe(now - request.arrived)
            self.metrics.requests.labels("ok").inc()
            request.emit("done", finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
                         completion_tokens=len(seq.output_ids))

    def _fail(self, request: Request, message: str, running: bool = True) -> None:
        if running and request.seq is not None:
            self.engine.abort(request.seq)
            self._running.pop(request.seq.id, None)
        self.metrics.requests.labels("error").inc()
        request.emit("error", message=message)

    def _update_gauges(self) -> None:
        engine = self.engine
        self.metrics.running.set(len(self._running))
        used = sum(len(s.prompt_ids) + len(s.output_ids) for s in engine.running)
        self.metrics.kv_usage.set(used / (engine.max_batch * engine.max_seq_len))
        if engine.device.type == "cuda":
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(engine.device))
