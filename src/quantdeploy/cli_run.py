"""The commands that run a model: ``generate``, ``bench``, ``serve`` and ``loadtest`` (handlers and flags).

``cli.build_parser`` registers them with ``add_commands``; errors and logging are ``cli.main``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from quantdeploy.cli_types import count, length_range, number, port
from quantdeploy.errors import ConfigError


def cmd_generate(args: argparse.Namespace) -> int:
    import quantdeploy as qd

    if args.transformers:  # any architecture transformers runs; greedy only
        if args.dtype:
            raise ConfigError("--dtype sets the engine's compute dtype; --transformers runs the model as loaded")
        bundle = qd.load(args.model)
        text, ids = qd.generate(bundle, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat)
        print(json.dumps({"text": text, "ids": ids}) if args.json else text)
        return 0
    from quantdeploy.device import resolve_device
    from quantdeploy.engine import Engine, SamplingParams

    resolve_device(args.device)  # a bad --device fails before the model loads
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop or ()))
    engine = Engine.load(args.model, args.device, engine_dtype(args), max_batch=1, max_seq_len=args.max_seq_len)
    if args.json:
        done = engine.generate(args.prompt, params, chat=args.chat)
        print(json.dumps({"text": done.text, "ids": done.token_ids, "finish_reason": done.finish_reason}))
        return 0
    for piece in engine.stream(args.prompt, params, chat=args.chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from quantdeploy.bench import decode
    from quantdeploy.eval.report import machine_info
    from quantdeploy.formats import checkpoint as ckpt

    if args.threads:
        torch.set_num_threads(args.threads)
    from quantdeploy.device import resolve_device

    device = resolve_device(args.device)
    original = None
    model_path = Path(args.model).expanduser()
    if not args.no_original and ckpt.is_checkpoint(model_path):
        _, manifest = ckpt.read_checkpoint(model_path)
        original = args.original or manifest.get("source", {}).get("path")
        if original is None or (not Path(original).expanduser().exists() and original != "bundled" and "/" not in original):
            raise ConfigError(f"the checkpoint's original model ({original}) is not on this machine; "
                              "pass --original PATH or --no-original")
    cfg = decode.BenchConfig(prompt_len=args.prompt_len, batches=tuple(args.batches), steps=args.steps,
                             max_seq_len=args.max_seq_len)
    cfg.seq_len()  # a cache too short for the runs is refused before anything loads
    console = Console(stderr=True)
    record = decode.run(args.model, original, device, cfg, engine_dtype(args), compile=True if args.compile else None,
                        on_result=lambda name, _: console.print(f"[dim]{name} done[/dim]"))
    table = Table(title=f"quantdeploy bench on {device} (copy bandwidth {record['bandwidth_gbs']:.1f} GB/s)")
    for header in decode.HEADERS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for name, result in record["results"].items():
        for row in decode.table_rows(name, result):
            table.add_row(*row)
    Console().print(table)
    for batch, ratio in record.get("speedup_vs_original", {}).items():
        print(f"batch {batch}: {ratio:.2f}x the original's decode tok/s")
    out = {**machine_info(), "device": str(device), "config": dataclasses.asdict(cfg), **record}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check what can be checked, take the port, then serve; the model loads behind an open socket (/health
    says 503 until it is ready), and a model that fails to load stops the server with one line, exit 2."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the server needs {', '.join(missing)}: pip install 'quantdeploy[serve]'")
    from quantdeploy.device import resolve_device
    from quantdeploy.engine import Engine
    from quantdeploy.serve.app import ServeConfig, create_app
    from quantdeploy.serve.engine_loop import EngineSpec
    from quantdeploy.serve.server import Server, listen

    check_model_source(args.model)
    config = ServeConfig(model_name=args.model_name or Path(args.model).name, max_queue=args.max_queue,
                         api_key=args.api_key or os.environ.get("QUANTDEPLOY_API_KEY"),
                         max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                         max_body_bytes=args.max_body_bytes, shutdown_deadline_s=args.shutdown_deadline,
                         prefill_wait_steps=args.prefill_wait_steps)
    device = str(resolve_device(args.device))
    options = dict(dtype=engine_dtype(args), max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                   compile=True if args.compile else None,
                   buckets=(args.max_batch,) if args.one_bucket else None, prefill_graph_tokens=args.prefill_graph_tokens,
                   kv_cache_tokens=args.kv_cache_tokens, prefill_chunk_tokens=args.prefill_chunk_tokens or None)
    in_process = args.engine == "process" or (args.engine == "auto" and device.startswith("cuda"))
    sock, address = listen(args.host, args.port)
    log = logging.getLogger("quantdeploy")
    log.info("listening on %s; loading %s (engine loop in a %s); GET /health answers 200 once it is ready",
             address, args.model, "process of its own" if in_process else "thread of the server")
    server: Server | None = None
    failure: list[str] = []

    def on_loaded(error: str | None) -> None:
        if error is None:
            log.info("ready: serving %s as '%s' at %s/v1", args.model, config.model_name, address)
            return
        failure.append(error)
        server.should_exit = True  # nothing to serve: stop rather than answer 503 forever

    app = create_app(EngineSpec(args.model, device, options) if in_process
                     else (lambda: Engine.load(args.model, device, **options)), config, on_loaded=on_loaded)
    server = Server(app, config.shutdown_deadline_s)
    server.serve_on(sock)
    if failure:
        raise ConfigError(f"the model failed to load: {failure[0]}")
    return 0


def check_model_source(model: str) -> None:
    """The cheap checks of a model argument (it exists, a checkpoint is complete and unaltered in size), so
    that a command that loads in the background still fails at once, in one line, on a bad path."""
    from quantdeploy.engine.loading import check_config
    from quantdeploy.formats import checkpoint as ckpt
    from quantdeploy.models.loading import check_source

    path = Path(model).expanduser()
    if ckpt.is_checkpoint(path):
        ckpt.read_checkpoint(path, verify_hashes=False)  # the load verifies the hashes
        check_config(path, model)
        return
    where = check_source(model)
    if isinstance(where, Path) and where.is_dir():  # a GGUF file or a hub name is read when it loads
        check_config(where, model)


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:
        raise ConfigError("the load generator needs aiohttp: pip install 'quantdeploy[serve]'")

    from quantdeploy.bench import loadtest
    from quantdeploy.eval.report import machine_info

    cfg = loadtest.LoadConfig(url=args.url, requests=args.requests, concurrency=None if args.rate else args.concurrency,
                              rate=args.rate, duration=args.duration, prompt_len=args.prompt_len,
                              output_len=args.output_len, model=args.model, api_key=args.api_key, timeout=args.timeout)
    freeze_client_heap()
    try:
        result = asyncio.run(loadtest.run(cfg))
    finally:  # collectable again at exit: frozen native objects alive at shutdown make nanobind print leak reports
        import gc

        gc.unfreeze()
    print(loadtest.table(result))
    out = {**machine_info(), **result}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


def freeze_client_heap() -> None:
    """Keep the load generator's own collector pauses out of the latencies it measures: a full collection of
    a process that imported quantdeploy walks ~400k objects (~250 ms on 2 cores), and every stream's gap
    would show it. What is alive now is left out of later collections (``gc.freeze``)."""
    import gc

    gc.collect()
    gc.freeze()


def engine_dtype(args: argparse.Namespace):  # noqa: ANN201 - a torch.dtype or None
    import torch

    return getattr(torch, args.dtype) if args.dtype else None


def _add_engine_flags(p: argparse.ArgumentParser, compile_flag: bool = True, max_seq_len_flag: bool = True) -> None:
    """The engine settings that generate, bench and serve share."""
    p.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the engine's compute dtype (default: the checkpoint's). bfloat16 on a CPU with AVX-512 "
                        "BF16 decodes an fp32 model about twice as fast (measured on the bundled model)")
    if max_seq_len_flag:
        p.add_argument("--max-seq-len", type=count(2), help="context window to allocate (default: min(model's, 2048))")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step on the CPU too (inductor C++; about a minute per batch size)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add generate, bench, serve and loadtest to the ``quantdeploy`` parser's subcommands."""
    p = sub.add_parser("generate", help="text continuation through the engine (streamed)")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=count(1), default=32)
    p.add_argument("--temperature", type=number(0, 100), default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=count(0), default=0)
    p.add_argument("--top-p", type=number(0, 1), default=1.0)
    p.add_argument("--repetition-penalty", type=number(0.01, 100), default=1.0)
    p.add_argument("--seed", type=count(0))
    p.add_argument("--stop", nargs="+", help="stop strings")
    _add_engine_flags(p, compile_flag=False)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--transformers", action="store_true",
                   help="greedy through transformers' generate instead (any architecture transformers runs)")
    p.add_argument("--json", action="store_true", help="print {text, ids, finish_reason} as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="engine speed: prefill, TTFT, decode tok/s per batch, memory, GB/s vs the original")
    p.add_argument("model", help="quantdeploy checkpoint or any model source")
    p.add_argument("--original", help="the unquantized original (default: the checkpoint's recorded source)")
    p.add_argument("--no-original", action="store_true", help="bench the model alone")
    p.add_argument("--batches", type=count(1), nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=count(1), default=128)
    p.add_argument("--steps", type=count(1), default=32, help="timed decode steps per batch size")
    p.add_argument("--threads", type=count(1), help="CPU threads (default: PyTorch's, one per physical core)")
    p.add_argument("--max-seq-len", type=count(2),
                   help="cache positions per row, as serve allocates them (default 2048, or what the runs need)")
    _add_engine_flags(p, max_seq_len_flag=False)
    p.add_argument("--json", help="also write the record to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (needs [serve])")
    p.add_argument("model", help="quantdeploy checkpoint or any model source")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000, help="TCP port (0: any free port, printed)")
    p.add_argument("--max-batch", type=count(1), default=16, help="sequences decoded together (batch rows)")
    p.add_argument("--kv-cache-tokens", type=count(64),
                   help="positions the paged KV cache holds over all sequences; requests wait for free blocks "
                        "(default: every row at max-seq-len, on a GPU at most 60%% of the free memory)")
    p.add_argument("--prefill-chunk-tokens", type=count(0), default=2048,  # engine.PREFILL_CHUNK_TOKENS (torch not imported here)
                   help="prompts longer than this are prefilled a chunk per engine step while the other requests "
                        "keep decoding (0: whole prompts)")
    p.add_argument("--max-queue", type=count(0), default=256,
                   help="requests that may wait beyond the free batch rows before the server answers 429")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set QUANTDEPLOY_API_KEY)")
    p.add_argument("--max-prompt-tokens", type=count(1), help="default: the context window")
    p.add_argument("--max-new-tokens", type=count(1), default=1024)
    p.add_argument("--max-body-bytes", type=count(64), default=1 << 20)
    p.add_argument("--shutdown-deadline", type=number(0, 3600), default=30.0, help="seconds to finish in-flight requests")
    p.add_argument("--model-name", help="the id /v1/models reports (default: the folder name)")
    p.add_argument("--one-bucket", action="store_true",
                   help="always decode max-batch rows: one compiled graph, no compile stalls as load ramps up")
    p.add_argument("--engine", choices=("auto", "process", "thread"), default="auto",
                   help="where the engine loop runs: a process of its own (auto on a GPU: it stops sharing one "
                        "interpreter lock with HTTP) or a thread of the server (auto on a CPU)")
    p.add_argument("--prefill-graph-tokens", type=count(0),
                   help="on a GPU, prefills of up to this many padded tokens replay CUDA graphs captured at startup "
                        "(default 4096; 0: every prefill eager, no graph memory)")
    p.add_argument("--prefill-wait-steps", type=count(0), default=0,
                   help="while rows decode, gather new requests up to this many steps (or until they fill the free "
                        "rows) and prefill them together; 0 admits each at once")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="HTTP load generator for OpenAI-compatible servers (TTFT, TPOT, ITL, e2e)")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=count(1), default=200)
    p.add_argument("--concurrency", type=count(1), default=64, help="concurrent clients (ignored with --rate)")
    p.add_argument("--rate", type=number(1e-3, 1e6), help="Poisson arrivals, requests per second")
    p.add_argument("--duration", type=number(1e-3, 1e7), help="stop issuing requests after this many seconds")
    p.add_argument("--prompt-len", type=length_range, default="32", help="words per prompt: N or LO:HI (uniform)")
    p.add_argument("--output-len", type=length_range, default="32",
                   help="max_tokens: N or LO:HI (uniform); ignore_eos is set")
    p.add_argument("--model")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=number(1e-3, 1e7), default=300.0)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_loadtest)
