"""The command line of quantdeploy: quantize, measure, run and serve a model.

One subcommand per public function: quantize, eval, inspect and demo here; generate, bench, serve and
loadtest, the commands that run a model, in ``cli_run``.

Errors a user can cause (:class:`~quantdeploy.errors.QuantDeployError`) print one line and exit 2;
anything else is a bug and keeps its traceback. Long steps show rich progress bars on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantdeploy import cli_deploy, cli_experiment, cli_run, cli_tasks
from quantdeploy.cli_types import Parser, count, number
from quantdeploy.errors import ConfigError, QuantDeployError

err_console = Console(stderr=True)
# Piped or redirected, rich would wrap tables at 80 columns ("0.00…"): give them the width they need.
out_console = Console() if sys.stdout.isatty() else Console(width=1000)
log = logging.getLogger("quantdeploy")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def run_with_progress(description: str, fn, *args, **kwargs):
    """Call ``fn(*args, progress=callback, **kwargs)`` under a progress bar; when stderr is not a terminal
    (a log file, CI), a log line at every tenth of the work and at most every 30 s instead."""
    if not err_console.is_terminal:
        started = time.monotonic()
        last = {"tenth": -1, "at": started}

        def log_line(done: int, total: int, *_: Any) -> None:
            now = time.monotonic()
            tenth = int(10 * done / total) if total else -1
            if tenth > last["tenth"] or now - last["at"] >= 30:
                last.update(tenth=tenth, at=now)
                log.info("%s: %s%s, %.0f s", description, f"{done}/{total}" if total else done,
                         f" ({100 * done / total:.0f}%)" if total else "", now - started)

        return fn(*args, progress=log_line, **kwargs)
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
        raise ConfigError("no method given; pass --method (rtn, halfquad, nf4, fp8, gptq, awq, awq+gptq, "
                          "smoothquant, smoothquant+gptq) or a --recipe with 'method'")
    recipe.pop("method", None)
    recipe.pop("kv_cache", None)  # read by build_kv_config
    mixed_recipe = recipe.pop("mixed", None)  # read by build_mixed_config
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
            if (args.kv_cache or args.bits_budget is not None or args.max_kld or args.max_ppl_increase or args.pin
                    or mixed_recipe):
                calibration = {}  # the flags were for the KV-cache scales or the sensitivities
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


def build_mixed_config(args: argparse.Namespace, config: Any):  # noqa: ANN201
    """The mixed-precision config from --bits-budget / --max-kld / --max-ppl-increase / --pin and the
    recipe's ``mixed`` mapping (flags win; None when neither asks for it); the sensitivities are measured
    on --calib, else on the method's calibration text."""
    from quantdeploy.quant.mixed import MixedConfig

    recipe = _read_recipe(Path(args.recipe)) if args.recipe else {}
    values = dict(recipe.get("mixed") or {})
    if isinstance(values.get("pin"), dict):  # YAML's natural form: {regex: option}
        values["pin"] = [[pattern, option] for pattern, option in values["pin"].items()]
    for key, value in (("bits_budget", args.bits_budget), ("max_kld", args.max_kld),
                       ("max_ppl_increase", None if args.max_ppl_increase is None else args.max_ppl_increase / 100)):
        if value is not None:
            values[key] = value
    for pin in args.pin or []:
        pattern, sep, option = pin.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"--pin takes REGEX=OPTION (for example 'down_proj=int8-sym-per-channel'), got {pin!r}")
        values["pin"] = [*values.get("pin", []), [pattern, option]]
    if not values:
        return None
    source = args.calib or getattr(getattr(config, "calibration", None), "source", "")
    mixed = MixedConfig.from_dict(values)
    return mixed.replace(calibration=mixed.calibration.replace(source=source, seed=args.seed))


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
             "activations": True if args.w8a8 else None, "clip_search": False if args.no_clip_search else None}
    if args.group_size is not None:  # 0 means per-channel, stored as None: set here, past the None filter
        if "group_size" not in fields:
            raise ConfigError(f"--group-size does not apply to method '{name}'")
        values["group_size"] = None if args.group_size == 0 else args.group_size
        values["pin_group_size"] = True
    for key, value in flags.items():
        if value is None:
            continue
        if key not in fields:
            flag = {"bits": "--bits", "symmetric": "--sym/--asym", "alpha": "--alpha", "activations": "--w8a8",
                    "clip_search": "--no-clip-search"}[key]
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
    from quantdeploy.device import resolve_device
    from quantdeploy.formats.checkpoint import check_output
    from quantdeploy.quant.calibration import check_source

    # Everything a user can get wrong fails here, before the model loads or any long work starts.
    config = build_method_config(args)
    kv_cache = build_kv_config(args)
    if kv_cache is not None and not kv_cache.calibration.source and hasattr(config, "calibration"):
        kv_cache = kv_cache.replace(calibration=config.calibration)  # the method's data serves the scales too
    if hasattr(config, "calibration"):
        check_source(config.calibration, f"method '{args.method or config.TYPE}'")
    if kv_cache is not None:
        check_source(kv_cache.calibration, "--kv-cache (its scales are measured)")
    mixed = build_mixed_config(args, config)
    if mixed is not None:
        check_source(mixed.calibration, "--bits-budget (each layer's sensitivity is measured on it)")
    if args.device is not None:
        resolve_device(args.device)
    out = Path(args.output)
    check_output(out, args.overwrite)
    with err_console.status("loading model"):
        base = qd.load_model(args.model, adapter=args.adapter, dtype=args.dtype)
    quantized = run_with_progress("quantizing", qd.quantize, base, config, seed=args.seed, device=args.device,
                                 kv_cache=kv_cache, mixed=mixed)
    with err_console.status("saving"):
        size = qd.save(quantized, out, overwrite=args.overwrite)
    info = qd.describe(quantized)
    out_console.print(f"saved {out} ({size / 1e6:.1f} MB on disk, {info['bits_per_weight']:.3f} bits per weight "
                      f"over {len(info['modules'])} quantized modules)")
    if mixed is not None:
        _print_mixed(quantized.quant_config["mixed"])
    return 0


def _print_mixed(record: dict) -> None:
    if "allocation" in record:
        a = record["allocation"]
        out_console.print(f"mixed precision: {a['average_bits']:.3f} bits per weight under a budget of {a['budget']}; "
                          f"layers per option {record['layers_per_option']}; KLD on the sensitivity windows: "
                          f"predicted {a['predicted_kld']:.4f}, measured {record['measured_kld']:.4f}")
        return
    p = record["progressive"]
    out_console.print(f"mixed precision: {p['average_bits']:.3f} bits per weight, validation KLD {p['measured_kld']:.4f} "
                      f"(95% upper bound {p['kld_bound']:.4f}), perplexity {100 * p['ppl_increase']:+.2f}% "
                      f"(bound {100 * p['ppl_bound']:+.2f}%); layers per option {record['layers_per_option']}")
    for step in p["path"]:
        out_console.print(f"  step {step['step']:4d}: {step['average_bits']:6.3f} bits  KLD {step['kld']:.4f} "
                          f"(bound {step['kld_bound']:.4f}, predicted {step['predicted_kld']:.4f})  "
                          f"perplexity {100 * step['ppl_increase']:+.2f}%")


# -------------------------------------------------------------------------------------------- eval
def _protocol(args: argparse.Namespace):
    from quantdeploy.eval.fidelity import EvalProtocol

    return EvalProtocol(max_tokens=args.tokens or None, window=args.window, stride=args.stride, bos=args.bos)


def cmd_eval(args: argparse.Namespace) -> int:
    import quantdeploy as qd
    from quantdeploy.eval.compare import compare
    from quantdeploy.eval.report import rich_table

    from quantdeploy.eval.text import load_text

    if args.task and args.text:
        raise ConfigError("eval takes --text (perplexity, KL divergence) or --task (task accuracy), not both; "
                          "run it once for each")
    if args.task:
        return cli_tasks.cmd_eval_tasks(args, out_console, err_console, write_json)
    if not args.text:
        raise ConfigError("eval needs --text FILE (perplexity and KL divergence) or --task NAME_OR_FILE (task accuracy)")
    protocol = _protocol(args)
    load_text(args.text)  # a bad text fails before the models load
    with err_console.status("loading models"):
        model = qd.load(args.model)
        baseline = qd.load(args.baseline) if args.baseline else None
    rows = run_with_progress("evaluating", compare, {Path(args.model).name or args.model: model}, baseline,
                             args.text, protocol)
    result = {"protocol": protocol.to_dict(), "text": str(args.text), "results": rows}
    if args.json == "-":
        print(json.dumps(result))
        return 0
    out_console.print(rich_table(rows, title=f"{args.text}: {rows[-1]['tokens_scored']} tokens scored"))
    if args.json:
        write_json(Path(args.json), result)
    return 0


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None


# ------------------------------------------------------------------------------- generate, inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    import quantdeploy as qd
    from quantdeploy.formats.checkpoint import folder_size, read_checkpoint

    path = Path(args.checkpoint)
    quant_config, manifest = read_checkpoint(path)  # every file's sha256 against the manifest, as every load does
    if args.plots and "mixed" not in quant_config:
        raise ConfigError(f"{path} is not a mixed-precision checkpoint (no per-layer plan to plot); quantize with "
                          "--bits-budget or --max-kld to get one")
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
                      f"{manifest.get('quantdeploy_version')}; hashes verified")
    if args.plots:
        from quantdeploy.eval.mixed_report import write_mixed_plots

        written = write_mixed_plots(quant_config["mixed"], Path(args.plots))
        out_console.print(f"plots: {', '.join(str(p) for p in written)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from quantdeploy.bench.experiment_report import write_report as write_experiment_report
    from quantdeploy.demo import DEMO_METHODS, default_text_path, run_demo
    from quantdeploy.eval.report import rich_table, write_report

    from quantdeploy.eval.text import load_text
    from quantdeploy.formats.checkpoint import check_output

    protocol = _protocol(args)
    text = args.text or default_text_path()
    load_text(text)  # bad text or an unwritable report folder fail before the five quantizations
    for name, _ in DEMO_METHODS:
        check_output(Path(args.out) / "checkpoints" / name, overwrite=True)
    err_console.print(f"demo: {len(DEMO_METHODS)} methods on {args.model}, scored on {text} "
                      f"({protocol.max_tokens} tokens, {protocol.window}-token windows)", soft_wrap=True)
    rows, meta = run_with_progress("quantizing and evaluating", run_demo, args.model, text, protocol, Path(args.out))
    out_console.print(rich_table(rows, title=f"{meta['model']} on {Path(str(text)).name}: "
                                             f"{rows[-1]['tokens_scored']} tokens scored"))
    written = write_report(Path(args.out), rows, meta)
    out_console.print(f"report: {', '.join(str(p) for p in written)}; checkpoints in {Path(args.out) / 'checkpoints'}")
    page = write_experiment_report(Path(args.out) / "experiment")[1]
    out_console.print(f"the experiment page (fidelity, a multiple-choice task, size, speed, per-layer error): {page}")
    return 0


# ------------------------------------------------------------------------------------------ parser
def _add_protocol_flags(p: argparse.ArgumentParser, text_required: bool) -> None:
    p.add_argument("--text", required=text_required, help="evaluation text: .txt, .jsonl or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--tokens", type=count(0), default=32768, help="text tokens to score (0: all)")
    p.add_argument("--window", type=count(2), default=1024, help="tokens per window")
    p.add_argument("--stride", type=count(1), default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto", help="prepend BOS to each window")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="quantdeploy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="quantize a model and save a checkpoint folder")
    p.add_argument("model", help="HF checkpoint folder, .gguf file, hub name, or 'bundled'")
    p.add_argument("--method", help="rtn, halfquad, nf4, fp8, gptq, awq, awq+gptq, smoothquant or smoothquant+gptq")
    p.add_argument("--alpha", type=number(0, 1), help="smoothquant: migration strength in [0, 1] (default: searched per layer)")
    p.add_argument("--w8a8", action="store_true", help="fp8: also quantize activations per token (W8A8)")
    p.add_argument("--kv-cache", choices=("int8", "fp8_e4m3"),
                   help="also quantize the KV cache (static per-head scales measured on the --calib data)")
    p.add_argument("--recipe", help="YAML file with the method and its settings (flags override it)")
    p.add_argument("--bits", type=int, help="rtn/gptq: 8, 4, 3 or 2 (default 4)")
    p.add_argument("--group-size", type=count(0),
                   help="weights per scale along the input; 0: per channel. Default: per channel for --bits 8, "
                        "else 128 (or the largest group that divides a layer, logged); a size typed here is pinned")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric grid")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False, help="asymmetric grid")
    p.add_argument("--no-clip-search", action="store_true",
                   help="rtn/gptq: span each group's whole range instead of searching the clip with the least error")
    p.add_argument("--include", nargs="+", help="module names or re:REGEX to quantize (default: all Linear)")
    p.add_argument("--exclude", nargs="+", help="module names or re:REGEX to leave out")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output head")
    p.add_argument("--embeddings", action="store_true", help="also quantize the input embeddings")
    p.add_argument("--bits-budget", type=number(1, 32),
                   help="mixed precision: a spec per layer (int8, int4 g32/g128, int3 g64 or kept) with the least "
                        "measured KLD at this average of stored bits per weight; sensitivities on 4 windows of "
                        "128 tokens of the --calib text (a forward pass per layer and candidate)")
    p.add_argument("--max-kld", type=number(0), help="mixed precision: the smallest model (layers moved from the "
                   "original to int8, int4, int3, most robust first) whose KLD on 32 validation windows of the "
                   "--calib text is at most this (its one-sided 95%% upper bound)")
    p.add_argument("--max-ppl-increase", type=number(0), help="mixed precision: as --max-kld, for perplexity (percent)")
    p.add_argument("--pin", action="append", metavar="REGEX=OPTION",
                   help="mixed precision: layers whose name matches REGEX take OPTION (a candidate such as "
                        "int8-sym-per-channel, or original) and are not searched; repeatable")
    p.add_argument("--calib", help="calibration data: .txt, fine-tuning .jsonl (chat/instruction) or hf:NAME")
    p.add_argument("--calib-samples", type=count(1), help="calibration samples (default 128)")
    p.add_argument("--calib-seq-len", type=count(16), help="tokens per calibration sample (default 512)")
    p.add_argument("--device", help="device for calibrated methods (default: cuda if present, else cpu)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder to merge before quantizing")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_quantize, symmetric=None)

    p = sub.add_parser("eval", help="perplexity, KL divergence or task accuracy, against the original")
    p.add_argument("model", help="quantdeploy checkpoint or any model source")
    p.add_argument("--baseline", help="the original model, for KL divergence, paired task comparisons and side-by-side numbers")
    _add_protocol_flags(p, text_required=False)
    cli_tasks.add_task_flags(p)
    p.add_argument("--json", help="also write the results to this JSON file ('-': print them as JSON instead of the table)")
    p.set_defaults(func=cmd_eval)

    cli_run.add_commands(sub)
    cli_experiment.add_commands(sub)

    p = sub.add_parser("inspect", help="per-layer spec, bits per weight and size of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 against the manifest (always done now, as on every load; kept for scripts)")
    p.add_argument("--plots", metavar="DIR",
                   help="a mixed-precision checkpoint: write its per-layer sensitivity heatmap and bits-vs-KLD plot here")
    p.set_defaults(func=cmd_inspect)

    cli_deploy.add_commands(sub)

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
    hf_logging.set_verbosity_error()  # its load report would repeat, as a table, the one line we raise
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    # To a terminal, rich's handler; to a file or a pipe, plain timestamped lines that nothing wraps.
    handler = (RichHandler(console=err_console, show_path=False, show_time=False) if err_console.is_terminal
               else logging.StreamHandler(sys.stderr))
    if not err_console.is_terminal:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", handlers=[handler])
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
