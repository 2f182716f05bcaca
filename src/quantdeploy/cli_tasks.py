"""``quantdeploy eval MODEL --task ...``: task accuracy of a model, and against the original on the same items.

Kept apart from ``cli.py`` (which owns the perplexity/KL divergence side of ``eval``) because tasks bring
their own flags (shots, limits, sampling for pass@k, the code sandbox's limits) and their own table:
score ± standard error per metric, and with ``--baseline`` the paired difference, the flips and
McNemar's p (``eval/tasks/scoring.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from quantdeploy.cli_types import count, number


def add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tasks (instead of --text)")
    g.add_argument("--task", action="append", metavar="NAME_OR_FILE",
                   help="humaneval, or a BIG-bench task.json (or its folder); repeat for several")
    g.add_argument("--shots", type=count(0), help="few-shot examples per prompt (default: 0 multiple choice, 3 exact match)")
    g.add_argument("--limit", type=count(1), help="only the first N items of each task")
    g.add_argument("--max-tokens", type=count(1), default=16, help="exact match: tokens generated per answer")
    g.add_argument("--code-max-tokens", type=count(1), default=384, help="humaneval: tokens per completion")
    g.add_argument("--samples", type=count(1), default=1, help="humaneval: completions per problem for pass@k")
    g.add_argument("--k", type=count(1), nargs="+", default=[1, 10], help="humaneval: k of pass@k (with --samples)")
    g.add_argument("--temperature", type=number(0, 2), default=0.8, help="humaneval: sampling temperature for pass@k")
    g.add_argument("--sandbox-timeout", type=number(0.1, 600), default=10.0, help="seconds per generated program")
    g.add_argument("--sandbox-memory-mb", type=count(64), default=1024, help="memory limit per generated program")
    g.add_argument("--seed", type=count(0), default=0, help="few-shot selection and sampling seed")


def cmd_eval_tasks(args: argparse.Namespace, out_console: Any, err_console: Any,
                   write_json: Callable[[Path, dict], None]) -> int:
    import json

    import quantdeploy as qd
    from quantdeploy.eval.tasks import TaskOptions, check_task, run_task, summarize
    from quantdeploy.eval.tasks.lm import TaskModel
    from quantdeploy.eval.tasks.sandbox import SandboxLimits

    for spec in args.task:
        check_task(spec)  # a bad task name fails before any model loads
    options = TaskOptions(shots=args.shots, limit=args.limit, seed=args.seed, max_tokens=args.max_tokens,
                          code_max_tokens=args.code_max_tokens, samples=args.samples, k=tuple(args.k),
                          temperature=args.temperature,
                          sandbox=SandboxLimits(timeout_s=args.sandbox_timeout, memory_mb=args.sandbox_memory_mb))
    with err_console.status("loading models"):
        model = TaskModel(qd.load(args.model), Path(args.model).name or args.model)
        baseline = TaskModel(qd.load(args.baseline), Path(args.baseline).name or args.baseline) if args.baseline else None
    results, rows = [], []
    for spec in args.task:
        with err_console.status(f"{spec}: {model.name}"):
            result = run_task(spec, model, options)
        base = None
        if baseline is not None:
            with err_console.status(f"{spec}: {baseline.name}"):
                base = run_task(spec, baseline, options)
        results.append({"model": result, "baseline": base})
        rows.extend(summarize(result, base))
    if args.json == "-":
        print(json.dumps({"options": _options_dict(options), "rows": rows, "results": results}))
        return 0
    out_console.print(_table(rows, model.name, baseline.name if baseline else None))
    if args.json:
        write_json(Path(args.json), {"options": _options_dict(options), "rows": rows, "results": results})
    return 0


def lm_eval_main() -> None:
    """``quantdeploy-lm-eval``: lm_eval's own command line with the ``quantdeploy`` model registered
    (``eval/lm_eval_adapter.py`` says why a plain ``lm_eval`` cannot find it)."""
    import sys

    try:
        import quantdeploy.eval.lm_eval_adapter  # noqa: F401 - registers the model
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        print("error: quantdeploy-lm-eval needs lm-evaluation-harness: pip install 'lm_eval[hf]'", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


def _options_dict(options: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(options)


def _table(rows: list[dict], name: str, baseline: str | None):  # noqa: ANN202 - a rich Table
    from rich.table import Table

    table = Table(title=f"{name}" + (f" against {baseline} (same items)" if baseline else ""))
    for col in ("task", "metric", "n", name) + ((baseline, "difference", "flips", "McNemar p") if baseline else ()):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in rows:
        cells = [r["task"], r["metric"], str(r["n"]), f"{r['score']:.3f} ± {r['stderr']:.3f}"]
        if baseline:
            cells += [f"{r['baseline']:.3f} ± {r['baseline_stderr']:.3f}", f"{r['diff']:+.3f} ± {r['diff_stderr']:.3f}",
                      f"{r['flips']} ({r['flip_rate']:.1%})", f"{r['mcnemar_p']:.3f}"]
        table.add_row(*cells)
    return table
