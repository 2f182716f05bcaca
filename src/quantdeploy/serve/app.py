"""The HTTP app: OpenAI-compatible completions and chat (streamed or not), ``/generate``, ``/v1/models``,
``/health``, ``/metrics``, over one ``Scheduler`` (continuous batching on one engine).

Everything a client can get wrong is answered in OpenAI's error shape with a 4xx: validation (400),
a missing or wrong API key (401, compared in constant time), a body over the size limit (413), limits
on prompt and output tokens (400, naming the limit), a full waiting queue (429 with Retry-After).
503 means not ready yet (model still loading), shutting down, or an engine process that died. The
model loads in the background after the socket opens, so ``/health`` answers 503 until it is ready.
The engine loop runs in a thread of this process or in a process of its own (``serve/engine_loop.py``
says when each pays off); the app is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import QuantDeployError
from quantdeploy.serve.engine_loop import PREFILL_WAIT_STEPS, EngineInfo, EngineProcess, EngineSpec, EngineThread, freeze_heap
from quantdeploy.serve.metrics import Metrics
from quantdeploy.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from quantdeploy.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, error_body


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str = "quantdeploy"
    max_queue: int = 256
    api_key: str | None = None
    max_prompt_tokens: int | None = None  # None: the engine's context window
    max_new_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    shutdown_deadline_s: float = 30.0
    retry_after_s: int = 1
    prefill_wait_steps: int = PREFILL_WAIT_STEPS  # see serve/engine_loop.py


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None, counted: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.code = code
        self.counted = counted  # the scheduler already counted this request's end (error, cancelled)


log = logging.getLogger(__name__)

#: the endpoints that generate; every answer they give is counted in ``quantdeploy_requests_total``
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")


class _State:
    def __init__(self) -> None:
        self.info: EngineInfo | None = None  # set once the engine is ready
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None


def create_app(engine: Callable[[], Engine] | EngineSpec, config: ServeConfig,
               on_loaded: Callable[[str | None], None] | None = None) -> FastAPI:
    """An app whose engine comes from ``engine()``, called in a background thread at startup and run in
    a thread of this process, or from an ``EngineSpec``, loaded and run in a process of its own (spawned:
    a script that builds such an app must start the server under ``if __name__ == "__main__":``).
    ``on_loaded(error)`` is called from the loading thread when the model is ready (None) or failed to
    load (the reason): the CLI logs the address, or stops the server, with it. ``app.state.drain()``
    (a coroutine) drains the scheduler at the shutdown signal, before connections are closed."""
    state, metrics = _State(), Metrics()

    def load(scheduler: Scheduler) -> None:
        try:
            if isinstance(engine, EngineSpec):
                process = EngineProcess(engine, config.prefill_wait_steps)
                scheduler.attach(process)
                info = process.start(scheduler.loop, scheduler.deliver, scheduler.engine_exited)
            else:
                thread = EngineThread(engine(), scheduler.deliver_threadsafe, config.prefill_wait_steps)
                scheduler.attach(thread)
                info = thread.info
            scheduler.rows = info.max_batch
            freeze_heap()  # this process's imports too: a full collection walks torch's and transformers' objects
            state.info = info
        except Exception as err:  # reported by /health, and to on_loaded (the CLI stops the server on it)
            state.load_error = str(err) if isinstance(err, QuantDeployError) else f"{type(err).__name__}: {err}"
        if on_loaded is not None:
            on_loaded(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.scheduler = Scheduler(config.max_queue, metrics)
        threading.Thread(target=load, args=(state.scheduler,), name="quantdeploy-load", daemon=True).start()
        yield
        await drain()  # graceful: stop admitting, finish or cancel within the deadline (once)

    app = FastAPI(title="quantdeploy", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes,
                       on_refused=lambda path: count_answer(path, 413))

    async def drain() -> None:
        if state.info is not None and state.scheduler.admitting:
            log.info("shutting down: finishing %d request(s) in flight (deadline %g s)", len(state.scheduler.requests),
                     config.shutdown_deadline_s)
        if state.info is not None:
            await asyncio.to_thread(state.scheduler.drain, config.shutdown_deadline_s)

    app.state.drain = drain

    def count_answer(path: str, status: int) -> None:
        """Answers that never reached the engine (4xx, 5xx before submission) count by their status."""
        if path in GENERATION_PATHS:
            metrics.requests.labels(str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        if not err.counted:
            count_answer(request.url.path, err.status)
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        count_answer(request.url.path, 400)
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            position = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            where = f" at character {position}" if position is not None else ""
            return JSONResponse(error_body(f"the request body is not valid JSON ({reason}{where})"), 400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where}: {first['msg']}" if where else first["msg"], param=where or None), 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        count_answer(request.url.path, 500)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), 500)

    def ready(request: Request) -> Scheduler:
        if config.api_key is not None:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error")
        if state.info is None:
            raise ApiError(503, "the model is still loading; retry shortly" if state.load_error is None
                           else f"the model failed to load: {state.load_error}", "server_error")
        if state.scheduler.failed:
            raise ApiError(503, state.scheduler.failed, "server_error")
        return state.scheduler

    def served(model: str | None) -> None:
        """A request for another model gets 404 ``model_not_found``, as OpenAI and vLLM answer."""
        if model is not None and model != config.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{config.model_name}' "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def params_for(n_prompt: int, max_tokens: int | None, body: Any) -> SamplingParams:
        engine = state.info
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
        limit = config.max_prompt_tokens or engine.max_seq_len - 1
        if n_prompt > limit:
            raise ApiError(400, f"the prompt has {n_prompt} tokens; this server's limit is {limit} (max prompt tokens)",
                           param="prompt")
        if max_tokens is not None and max_tokens > config.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_new_tokens} "
                           "(max new tokens)", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(config.max_new_tokens, engine.max_seq_len - n_prompt))
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                    stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos)
            engine.check(n_prompt, params)
        except QuantDeployError as err:
            raise ApiError(400, str(err), param="max_tokens") from None
        return params

    def submit(scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams):  # noqa: ANN202
        try:
            return scheduler.submit(prompt_ids, params)
        except QueueFull:
            raise ApiError(429, f"the server is at capacity ({scheduler.rows} rows busy, {config.max_queue} requests "
                           "waiting); retry later",
                           "rate_limit_error", headers={"Retry-After": str(config.retry_after_s)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_error") from None

    async def collect(http: Request, scheduler: Scheduler, job) -> tuple[str, dict]:  # noqa: ANN001
        """Await a request's events to the end; a client that goes away cancels it."""
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        scheduler.cancel(job)
                        raise ApiError(499, "client disconnected", counted=True) from None
                    continue
                if event["kind"] == "delta":
                    pieces.append(event["text"])
                elif event["kind"] == "error":
                    raise ApiError(500, event["message"], "server_error", counted=True)
                elif event["finish_reason"] == "abort":
                    raise ApiError(503, "the request was cancelled (server shutting down)", "server_error", counted=True)
                else:
                    return "".join(pieces), event
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise

    def stream(scheduler: Scheduler, job, chunk: Callable[[str | None, str | None], dict],  # noqa: ANN001
               include_usage: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                first = chunk(None, None)
                if first:
                    yield _sse(first)
                while True:
                    event = await job.events.get()
                    while event["kind"] == "delta" and not job.events.empty():  # under load: one chunk for all
                        following = job.events.get_nowait()                    # the text that is ready
                        if following["kind"] != "delta":
                            if event["text"]:
                                yield _sse(chunk(event["text"], None))
                            event = following
                            break
                        event = {**event, "text": event["text"] + following["text"]}
                    if event["kind"] == "delta":
                        if event["text"]:
                            yield _sse(chunk(event["text"], None))
                    elif event["kind"] == "error":
                        yield _sse(error_body(event["message"], "server_error"))
                        break
                    else:
                        yield _sse(chunk("", event["finish_reason"] if event["finish_reason"] != "abort" else "length"))
                        if include_usage and "prompt_tokens" in event:
                            yield _sse({**chunk("", None), "choices": [], "usage": _usage(event)})
                        break
                finished = True
                yield b"data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away mid-stream: free its row now
                    scheduler.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.info is None:
            return JSONResponse({"status": "loading" if state.load_error is None else "failed",
                                 "error": state.load_error}, 503)
        if state.scheduler.failed:
            return JSONResponse({"status": "failed", "error": state.scheduler.failed}, 503)
        if not state.scheduler.admitting:  # draining: a load balancer should send new requests elsewhere
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(http: Request) -> dict:
        ready(http)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "quantdeploy"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        scheduler = ready(http)
        served(body.model)
        if body.unsupported():
            raise ApiError(400, f"'{body.unsupported()}' is not supported by this server", param=body.unsupported())
        ids = state.info.encode(body.prompt)
        job = submit(scheduler, ids, params_for(len(ids), body.max_tokens, body))
        rid, created = f"cmpl-{job.id}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict:
            if text is None:
                return {}
            return {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return stream(scheduler, job, chunk, bool(body.stream_options and body.stream_options.include_usage))
        text, done = await collect(http, scheduler, job)
        return {**chunk(text, done["finish_reason"]), "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Any:
        scheduler = ready(http)
        served(body.model)
        if body.unsupported():
            raise ApiError(400, f"'{body.unsupported()}' is not supported by this server", param=body.unsupported())
        ids = _chat_ids(state.info, body)
        job = submit(scheduler, ids, params_for(len(ids), body.max_completion_tokens or body.max_tokens, body))
        rid, created = f"chatcmpl-{job.id}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return stream(scheduler, job, chunk, bool(body.stream_options and body.stream_options.include_usage))
        text, done = await collect(http, scheduler, job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": done["finish_reason"]}], "usage": _usage(done)}

    @app.post("/generate")
    async def generate(body: GenerateRequest, http: Request) -> dict:
        scheduler = ready(http)
        start = time.perf_counter()
        ids = state.info.encode(body.prompt)
        sampling = CompletionRequest(prompt=body.prompt, temperature=body.temperature)
        job = submit(scheduler, ids, params_for(len(ids), body.max_length, sampling))
        text, done = await collect(http, scheduler, job)
        return {"generated_text": text, "inference_time": time.perf_counter() - start,
                "tokens_generated": done["completion_tokens"]}

    return app


def _chat_ids(engine: EngineInfo, body: ChatCompletionRequest) -> list[int]:
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
    except ValueError as err:
        raise ApiError(400, str(err), param="messages") from None
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 in OpenAI's error shape, by
    header or as a chunked body streams in. The body is read here, up to the limit, and handed to the app
    whole: raising inside the app's own ``receive`` would reach FastAPI's body parser, which turns any
    error there into its own 400 ``{"detail": ...}``."""

    def __init__(self, app: Any, max_bytes: int, on_refused: Callable[[str], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, send)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending the body
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                return await self._refuse(scope, send)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnect notices, as the server sends them

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, send: Callable) -> None:
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""))
        body = json.dumps(error_body(f"request body over the limit of {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
