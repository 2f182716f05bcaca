"""The HTTP side of continuous batching: requests in flight, their event queues, backpressure, metrics.

Handlers ``submit`` requests (a full waiting queue raises ``QueueFull``, which the app answers with
429) and read their events from an ``asyncio.Queue``. The scheduler forwards each request to the
engine loop (``serve/engine_loop.py``, in a thread or a process of its own) and turns the event
batches that come back, once per engine step, into per-request events and metrics, all on the event
loop. Waiting means submitted but not yet admitted into a batch row. The bound counts requests in
flight against the free rows plus ``max_queue``: a burst to an idle server with 4 rows and a queue of 4
takes 8 requests (the rows are taken one engine step later), and the 9th gets 429.

A failure inside one request (its prefill, or non-finite logits) fails that request alone; a failing
decode step fails the requests in that batch and the engine loop carries on; an engine process that
dies fails everything in flight and turns ``/health`` to 503. ``drain`` stops admitting, lets requests
in flight finish until a deadline, then stops the engine loop, which cancels what is left: a stream
then ends with a final chunk and ``[DONE]``. It runs once, when the shutdown signal arrives (the CLI's
server calls it before uvicorn closes connections) or at the app's shutdown, whichever is first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from typing import Any

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue is at its bound: answer 429 and let the client retry."""


class ShuttingDown(Exception):
    """The server no longer admits requests."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: bool = False
    sent_tokens: int = 0
    last_token_at: float | None = None


class Scheduler:
    """Create it on the event loop, then ``attach`` the engine loop's transport (``EngineThread`` or
    ``EngineProcess``: anything with ``send(command)`` and ``join(timeout)``)."""

    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self.max_queue, self.metrics = max_queue, metrics
        self.loop = asyncio.get_running_loop()
        self.requests: dict[str, Request] = {}
        self.waiting = 0
        self.rows = 0  # the engine's batch rows, known once it is attached and loaded
        self.engine: Any = None
        self.failed: str | None = None  # why the engine is gone, if it is
        self.stopped = threading.Event()  # the engine loop has ended
        self._admitting = True
        self._drained = threading.Lock()  # taken by the first drain: the second returns at once

    def attach(self, engine: Any) -> None:
        self.engine = engine

    @property
    def admitting(self) -> bool:
        return self._admitting and not self.failed

    def deliver_threadsafe(self, batch: list) -> None:
        """For an engine thread: hand a batch to the event loop."""
        self.loop.call_soon_threadsafe(self.deliver, batch)

    # ------------------------------------------------------------------ handler side (event loop)
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request (after the lengths have been checked against the engine's limits)."""
        if not self.admitting:
            raise ShuttingDown()
        if len(self.requests) >= self.rows + self.max_queue:
            raise QueueFull()
        request = Request(prompt_ids, params, asyncio.Queue())
        self.requests[request.id] = request
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        self.engine.send(("submit", request.id, prompt_ids, params))
        return request

    def cancel(self, request: Request) -> None:
        if request.id in self.requests:
            self.engine.send(("cancel", request.id))

    # ------------------------------------------------------------------ events from the engine loop
    def deliver(self, batch: list) -> None:
        """Apply one engine step's events (on the event loop)."""
        now = time.perf_counter()
        m = self.metrics
        for event in batch:
            kind = event[0]
            if kind == "stopped":
                self.stopped.set()
                continue
            if kind == "stats":
                _, running, kv_usage, gpu_bytes, counts, step_seconds = event
                for seconds in step_seconds:
                    m.step.observe(seconds)
                m.running.set(running)
                m.kv_usage.set(kv_usage)
                if gpu_bytes:
                    m.gpu_memory.set(gpu_bytes)
                for name, added in counts.items():
                    if added:
                        m.engine[name].inc(added)
                continue
            request = self.requests.get(event[1])
            if request is None:  # already answered (e.g. cancelled on a dead engine)
                continue
            if kind == "admitted":
                self._admitted(request)
                m.queue_time.observe(now - request.arrived)
                m.prompt.inc(len(request.prompt_ids))
            elif kind == "delta":
                _, _, text, new = event
                if new:
                    if request.sent_tokens == 0:
                        m.ttft.observe(now - request.arrived)
                    elif request.last_token_at is not None:
                        m.itl.observe((now - request.last_token_at) / new)
                    request.sent_tokens += new
                    request.last_token_at = now
                    m.generated.inc(new)
                request.events.put_nowait({"kind": "delta", "text": text, "tokens": new})
            elif kind == "done":
                _, _, reason, n_prompt, n_output = event
                if reason == "abort":
                    m.requests.labels("cancelled").inc()
                else:
                    m.e2e.observe(now - request.arrived)
                    m.requests.labels("ok").inc()
                self._finish(request, {"kind": "done", "finish_reason": reason, "prompt_tokens": n_prompt,
                                       "completion_tokens": n_output})
            elif kind == "error":
                m.requests.labels("error").inc()
                self._finish(request, {"kind": "error", "message": event[2]})
        m.waiting.set(self.waiting)

    def engine_exited(self, message: str) -> None:
        """The engine process died: every request in flight fails, and no new one is admitted."""
        if self.stopped.is_set():
            return  # it was told to stop
        self.failed = message
        self.stopped.set()
        for request in list(self.requests.values()):
            self.metrics.requests.labels("error").inc()
            self._finish(request, {"kind": "error", "message": message})

    def _admitted(self, request: Request) -> None:
        if not request.admitted:
            request.admitted = True
            self.waiting -= 1

    def _finish(self, request: Request, event: dict) -> None:
        self._admitted(request)
        del self.requests[request.id]
        request.events.put_nowait(event)

    # ------------------------------------------------------------------ shutdown (from a worker thread)
    def drain(self, deadline_s: float) -> None:
        """Stop admitting; wait up to ``deadline_s`` for requests in flight, then stop the engine loop,
        which cancels the rest."""
        if not self._drained.acquire(blocking=False):
            return  # drained already (at the shutdown signal)
        self._admitting = False
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and self.requests and not self.failed:
            time.sleep(0.02)
        self.engine.send(("stop",))
        self.stopped.wait(60)
        self.engine.join(10)
        if self.requests:  # the engine loop did not answer in time: cancel what is left from here
            asyncio.run_coroutine_threadsafe(self._cancel_leftovers(), self.loop).result(timeout=10)

    async def _cancel_leftovers(self) -> None:
        for request in list(self.requests.values()):
            self.metrics.requests.labels("cancelled").inc()
            self._finish(request, {"kind": "done", "finish_reason": "abort"})
