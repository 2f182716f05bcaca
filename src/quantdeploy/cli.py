"""The command line: one subcommand per public function (quantize, eval, generate, bench, inspect, demo).

Errors a user can cause (:class:`~quantdeploy.errors.QuantDeployError`) print one line and exit 2;
anything else is a bug and keeps its traceback. Long steps show rich progress bars on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantdeploy.errors import ConfigError, QuantDeployError

err_console = Console(stderr=True)
out_console = Console()


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def run_with_progress(description: str, fn, *args, **kwargs):
    """Call ``fn(*args, progress=callback, **kwargs)`` under a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)

        def callback(done: int, total: int, *_: Any) -> None:
            bar.update(task, completed=done, total=total)

        return fn(*args, progress=callback, **kwargs)


# ---------------------------------------------------------------------------------------- quantize
#: methods that wrap a quantizer, and the quantizer settings they start from
WRAPPERS: dict[str, dict[str, Any]] = {"awq": {}, "smoothquant": {"bits": 8, "group_size": None}}


def build_method_config(args: argparse.Namespace):
    """A method config from --recipe (YAML) and the flags; flags win. Same schema as Python and YAML.

    ``awq`` and ``smoothquant`` wrap a quantizer (``awq+gptq``, ``smoothquant+gptq``; rtn when none is
    named): the grid flags (--bits, --group-size, --sym/--asym, targets) go to the nested quantizer,
    --alpha and the calibration flags to the outer method.
    """
    from quantdeploy.quant.methods import get_method

    recipe: dict[str, Any] = _read_recipe(Path(args.recipe)) if args.recipe else {}
    name = args.method or recipe.pop("method", None)
    if name is None:
        raise ConfigError("no method given; pass --method (rtn, nf4, fp8, gptq, awq, awq+gptq, smoothquant, "
                          "smoothquant+gptq) "
                          "or a --recipe with 'method'")
    recipe.pop("method", None)
    recipe.pop("kv_cache", None)  # read by build_kv_config
    outer_name, _, inner_name = name.partition("+")
    if inner_name and outer_name not in WRAPPERS:
        raise ConfigError(f"unknown method '{name}'; only awq and smoothquant compose with a quantizer "
                          "(awq+gptq, smoothquant+gptq)")
    method = get_method(outer_name)
    values = dict(recipe)
    if outer_name in WRAPPERS:
        quantizer = dict(values.get("quantizer", WRAPPERS[outer_name]))
        quantizer["type"] = inner_name or quantizer.get("type", "rtn")
        get_method(quantizer["type"])
        if args.alpha is not None:
            if "alpha" not in method.config_cls.__dataclass_fields__:
                raise ConfigError(f"--alpha does not apply to method '{name}'")
            values["alpha"] = args.alpha
        _apply_grid_flags(argparse.Namespace(**{**vars(args), "alpha": None}), quantizer,
                          get_method(quantizer["type"]).config_cls, name)
        values["quantizer"] = quantizer
    else:
        _apply_grid_flags(args, values, method.config_cls, name)
    calibration = _calibration_values(args, values.get("calibration", {}))
    if calibration:
        if "calibration" not in method.config_cls.__dataclass_fields__:
            if args.kv_cache:
                calibration = {}  # the flags were for the KV-cache scales
            else:
                raise ConfigError(f"method '{name}' uses no calibration data; drop --calib*")
        if calibration:
            values["calibration"] = calibration
    return method.config_cls.from_dict(values)


def build_kv_config(args: argparse.Namespace):
    """The KV-cache config from --kv-cache and the recipe's ``kv_cache`` mapping (None when neither),
    measured on the --calib data."""
    from quantdeploy.quant.kv_cache import KVCacheConfig

    recipe = _read_recipe(Path(args.recipe)) if args.recipe else {}
    values = dict(recipe.get("kv_cache") or {})
    if args.kv_cache:
        values["dtype"] = args.kv_cache
    if not values:
        return None
    values["calibration"] = _calibration_values(args, values.get("calibration", {}))
    return KVCacheConfig.from_dict(values)


def _calibration_values(args: argparse.Namespace, existing: dict[str, Any]) -> dict[str, Any]:
    calibration = dict(existing)
    for key, value in (("source", args.calib), ("num_samples", args.calib_samples), ("seq_len", args.calib_seq_len)):
        if value is not None:
            calibration[key] = value
    if calibration:
        calibration.setdefault("seed", args.seed)
    return calibration


def _apply_grid_flags(args: argparse.Namespace, values: dict[str, Any], config_cls, name: str) -> None:
    """--bits, --group-size, --sym/--asym and the target flags into ``values`` (a quantizer's dict)."""
    fields = set(config_cls.__dataclass_fields__)
    flags = {"bits": args.bits, "symmetric": args.symmetric, "alpha": args.alpha,
             "activations": True if args.w8a8 else None}
    if args.group_size is not None:  # 0 means per-channel, stored as None: set here, past the None filter
        if "group_size" not in fields:
            raise ConfigError(f"--group-size does not apply to method '{name}'")
        values["group_size"] = None if args.group_size == 0 else args.group_size
        values["pin_group_size"] = True
    for key, value in flags.items():
        if value is None:
            continue
        if key not in fields:
            flag = {"bits": "--bits", "symmetric": "--sym/--asym", "alpha": "--alpha", "activations": "--w8a8"}[key]
            raise ConfigError(f"{flag} does not apply to method '{name}'")
        values[key] = value
    targets = dict(values.get("targets", {}))
    if args.include:
        targets["include"] = args.include
    if args.exclude:
        targets["exclude"] = args.exclude
    if args.lm_head:
        targets["lm_head"] = True
    if args.embeddings:
        targets["embeddings"] = True
    if targets:
        values["targets"] = targets


def _read_recipe(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"no such recipe file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def cmd_quantize(args: argparse.Namespace) -> int:
    import quantdeploy as qd

    config = build_method_config(args)  # bad flags fail before anything is loaded
    kv_cache = build_kv_config(args)
    if kv_cache is not None and not kv_cache.calibration.source and hasattr(config, "calibration"):
        kv_cache = kv_cache.replace(calibration=config.calibration)  # the method's data serves the scales too
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    with err_console.status("loading model"):
        base = qd.load_model(args.model, adapter=args.adapter, dtype=args.dtype)
    quantized = run_with_progress("quantizing", qd.quantize, base, config, seed=args.seed, device=args.device,
                                 kv_cache=kv_cache)
    with err_console.status("saving"):
        size = qd.save(quantized, out, overwrite=args.overwrite)
    info = qd.describe(quantized)
    out_console.print(f"saved {out} ({size / 1e6:.1f} MB on disk, {info['bits_per_weight']:.3f} bits per weight "
                      f"over {len(info['modules'])} quantized modules)")
    return 0


# -------------------------------------------------------------------------------------------- eval
def _protocol(args: argparse.Namespace):
    from quantdeploy.eval.fidelity import EvalProtocol

    return EvalProtocol(max_tokens=args.tokens or None, window=args.window, stride=args.stride, bos=args.bos)


def cmd_eval(args: argparse.Namespace) -> int:
    import quantdeploy as qd
    from quantdeploy.eval.compare import compare
    from quantdeploy.eval.report import rich_table

    protocol = _protocol(args)
    with err_console.status("loading models"):
        model = qd.load(args.model)
        baseline = qd.load(args.baseline) if args.baseline else None
    rows = run_with_progress("evaluating", compare, {Path(args.model).name or args.model: model}, baseline,
                             args.text, protocol)
    out_console.print(rich_table(rows, title=f"{args.text}: {rows[-1]['tokens_scored']} tokens scored"))
    result = {"protocol": protocol.to_dict(), "text": str(args.text), "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------- generate, inspect
def cmd_generate(args: argparse.Namespace) -> int:
    import quantdeploy as qd

    if args.transformers:  # any architecture transformers runs; greedy only
        bundle = qd.load(args.model)
        text, ids = qd.generate(bundle, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat)
        print(json.dumps({"text": text, "ids": ids}) if args.json else text)
        return 0
    from quantdeploy.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop or ()))
    engine = Engine.load(args.model, args.device, max_batch=1, max_seq_len=args.max_seq_len)
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
    from quantdeploy.device import default_device

    device = torch.device(args.device) if args.device else default_device()
    original = None
    model_path = Path(args.model).expanduser()
    if not args.no_original and ckpt.is_checkpoint(model_path):
        _, manifest = ckpt.read_checkpoint(model_path)
        original = args.original or manifest.get("source", {}).get("path")
        if original is None or (not Path(original).expanduser().exists() and original != "bundled" and "/" not in original):
            raise ConfigError(f"the checkpoint's original model ({original}) is not on this machine; "
                              "pass --original PATH or --no-original")
    cfg = decode.BenchConfig(prompt_len=args.prompt_len, batches=tuple(args.batches), steps=args.steps)
    console = Console(stderr=True)
    record = decode.run(args.model, original, device, cfg, compile=True if args.compile else None,
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
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the server needs {', '.join(missing)}: pip install 'quantdeploy[serve]'")
    import uvicorn

    from quantdeploy.device import default_device
    from quantdeploy.engine import Engine
    from quantdeploy.serve.app import ServeConfig, create_app
    from quantdeploy.serve.engine_loop import EngineSpec

    config = ServeConfig(model_name=args.model_name or Path(args.model).name, max_queue=args.max_queue,
                         api_key=args.api_key or os.environ.get("QUANTDEPLOY_API_KEY"),
                         max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                         max_body_bytes=args.max_body_bytes, shutdown_deadline_s=args.shutdown_deadline,
                         prefill_wait_steps=args.prefill_wait_steps)
    device = str(args.device or default_device())
    options = dict(max_batch=args.max_batch, max_seq_len=args.max_seq_len, compile=True if args.compile else None,
                   buckets=(args.max_batch,) if args.one_bucket else None)
    in_process = args.engine == "process" or (args.engine == "auto" and device.startswith("cuda"))
    logging.getLogger(__name__).info("engine loop in a %s", "process of its own" if in_process else "thread of the server")
    app = create_app(EngineSpec(args.model, device, options, args.prefill_wait_steps) if in_process
                     else (lambda: Engine.load(args.model, device, **options)), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=int(config.shutdown_deadline_s) + 5)
    return 0


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
    result = asyncio.run(loadtest.run(cfg))
    print(loadtest.table(result))
    out = {**machine_info(), **result}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    import quantdeploy as qd
    from quantdeploy.formats.checkpoint import folder_size, read_checkpoint

    path = Path(args.checkpoint)
    _, manifest = read_checkpoint(path, verify_hashes=args.verify)
    info = qd.describe(qd.load(path))
    table = Table(title=str(path))
    for header in ("module", "spec", "shape", "bits/weight", "bytes"):
        table.add_column(header, justify="left" if header in ("module", "spec") else "right")
    for m in info["modules"]:
        table.add_row(m["module"], m["spec"], "x".join(map(str, m["shape"])), f"{m['bits_per_weight']:.3f}", f"{m['bytes']:,}")
    out_console.print(table)
    out_console.print(f"{len(info['modules'])} quantized modules, {info['quantized_weights']:,} weights at "
                      f"{info['bits_per_weight']:.3f} bits per weight; left in full precision: "
                      f"{', '.join(info['ignored']) or 'none'} (+ embeddings and norms unless quantized)")
    out_console.print(f"size on disk: {folder_size(path) / 1e6:.1f} MB; source: {manifest['source'].get('path')} "
                      f"({manifest['source'].get('kind')}); created {manifest.get('created_at')} with quantdeploy "
                      f"{manifest.get('quantdeploy_version')}" + ("; hashes verified" if args.verify else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from quantdeploy.demo import DEMO_METHODS, default_text_path, run_demo
    from quantdeploy.eval.report import rich_table, write_report

    protocol = _protocol(args)
    text = args.text or default_text_path()
    err_console.print(f"demo: {len(DEMO_METHODS)} methods on {args.model}, scored on {text} "
                      f"({protocol.max_tokens} tokens, {protocol.window}-token windows)")
    rows, meta = run_with_progress("quantizing and evaluating", run_demo, args.model, text, protocol, Path(args.out))
    out_console.print(rich_table(rows, title=f"{meta['model']} on {Path(str(text)).name}: "
                                             f"{rows[-1]['tokens_scored']} tokens scored"))
    written = write_report(Path(args.out), rows, meta)
    out_console.print(f"report: {', '.join(str(p) for p in written)}; checkpoints in {Path(args.out) / 'checkpoints'}")
    print(json.dumps({"meta": meta, "results": rows}))
    return 0


# ------------------------------------------------------------------------------------------ parser
def _add_protocol_flags(p: argparse.ArgumentParser, text_required: bool) -> None:
    p.add_argument("--text", required=text_required, help="evaluation text: .txt, .jsonl or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--tokens", type=int, default=32768, help="text tokens to score (0: all)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto", help="prepend BOS to each window")


def _add_engine_flags(p: argparse.ArgumentParser, compile_flag: bool = True, max_seq_len_flag: bool = True) -> None:
    """The engine settings that generate, bench and serve share."""
    p.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    if max_seq_len_flag:
        p.add_argument("--max-seq-len", type=int, help="context window to allocate (default: min(model's, 2048))")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step on the CPU too (inductor C++; about a minute per batch size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantdeploy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="quantize a model and save a checkpoint folder")
    p.add_argument("model", help="HF checkpoint folder, .gguf file, hub name, or 'bundled'")
    p.add_argument("--method", help="rtn, nf4, fp8, gptq, awq, awq+gptq, smoothquant or smoothquant+gptq")
    p.add_argument("--alpha", type=float, help="smoothquant: migration strength in [0, 1] (default: searched per layer)")
    p.add_argument("--w8a8", action="store_true", help="fp8: also quantize activations per token (W8A8)")
    p.add_argument("--kv-cache", choices=("int8", "fp8_e4m3"),
                   help="also quantize the KV cache (static per-head scales measured on the --calib data)")
    p.add_argument("--recipe", help="YAML file with the method and its settings (flags override it)")
    p.add_argument("--bits", type=int, help="rtn: 8, 4, 3 or 2")
    p.add_argument("--group-size", type=int, help="weights per scale along the input (0: per-channel); pinned")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric grid")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False, help="asymmetric grid")
    p.add_argument("--include", nargs="+", help="module names or re:REGEX to quantize (default: all Linear)")
    p.add_argument("--exclude", nargs="+", help="module names or re:REGEX to leave out")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output head")
    p.add_argument("--embeddings", action="store_true", help="also quantize the input embeddings")
    p.add_argument("--calib", help="calibration data: .txt, fine-tuning .jsonl (chat/instruction) or hf:NAME")
    p.add_argument("--calib-samples", type=int, help="calibration samples (default 128)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration sample (default 512)")
    p.add_argument("--device", help="device for calibrated methods (default: cuda if present, else cpu)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to merge before quantizing")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_quantize, symmetric=None)

    p = sub.add_parser("eval", help="perplexity and KL divergence against the original")
    p.add_argument("model", help="quantdeploy checkpoint or any model source")
    p.add_argument("--baseline", help="the original model, for KL divergence and side-by-side numbers")
    _add_protocol_flags(p, text_required=True)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="text continuation through the engine (streamed)")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
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
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per physical core)")
    _add_engine_flags(p, max_seq_len_flag=False)
    p.add_argument("--json", help="also write the record to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (needs [serve])")
    p.add_argument("model", help="quantdeploy checkpoint or any model source")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set QUANTDEPLOY_API_KEY)")
    p.add_argument("--max-prompt-tokens", type=int, help="default: the context window")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--shutdown-deadline", type=float, default=30.0, help="seconds to finish in-flight requests")
    p.add_argument("--model-name", help="the id /v1/models reports (default: the folder name)")
    p.add_argument("--one-bucket", action="store_true",
                   help="always decode max-batch rows: one compiled graph, no compile stalls as load ramps up")
    p.add_argument("--engine", choices=("auto", "process", "thread"), default="auto",
                   help="where the engine loop runs: a process of its own (auto on a GPU: it stops sharing one "
                        "interpreter lock with HTTP) or a thread of the server (auto on a CPU)")
    p.add_argument("--prefill-wait-steps", type=int, default=0,
                   help="while rows decode, gather new requests up to this many steps (or until they fill the free "
                        "rows) and prefill them together; 0 admits each at once")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="HTTP load generator for OpenAI-compatible servers (TTFT, TPOT, ITL, e2e)")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (ignored with --rate)")
    p.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    p.add_argument("--duration", type=float, help="stop issuing requests after this many seconds")
    p.add_argument("--prompt-len", default="32", help="words per prompt: N or LO:HI (uniform)")
    p.add_argument("--output-len", default="32", help="max_tokens: N or LO:HI (uniform); ignore_eos is set")
    p.add_argument("--model")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("inspect", help="per-layer spec, bits per weight and size of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="quantize the bundled model several ways and compare with the original")
    p.add_argument("--model", default="bundled", help="model to demo (default: the bundled SmolLM2-135M)")
    _add_protocol_flags(p, text_required=False)
    p.add_argument("--out", default="report", help="report folder")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_library_progress_bars() -> None:
    """The CLI draws its own progress; transformers' per-tensor bars would bury it (public switches)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])
    for noisy in ("transformers", "httpx", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_library_progress_bars()
    try:
        return args.func(args)
    except QuantDeployError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
