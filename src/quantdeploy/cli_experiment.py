"""The ``experiment`` and ``report`` commands: a grid of recipes on one model, then its pictures.

``experiment`` runs every cell not yet complete (``bench/experiment.py``: a killed run resumes) with a
progress bar on stderr; ``report`` turns a run folder into Markdown and a self-contained HTML page
(``bench/experiment_report.py``).
"""

from __future__ import annotations

import argparse


def cmd_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from quantdeploy.bench.experiment import cells, read_grid, run

    spec = read_grid(args.grid)
    if args.device:
        spec["device"] = args.device
    todo = cells(spec)  # a bad grid fails here, before the model loads
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("original", total=len(todo))

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, description=label[:60])

        paths = run(spec, args.out, progress)
    print(f"{len(paths) - 1} cells and the original in {args.out}/cells; next: quantdeploy report {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from quantdeploy.bench.experiment_report import write_report

    paths = write_report(args.run)
    print(f"wrote {paths[1]} (self-contained) and {paths[0]} with {len(paths) - 2} plots")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of recipes on one model (resumable), for 'report'")
    p.add_argument("grid", help="grid YAML: model, text, tokens, calibration, tasks, bench, grid axes")
    p.add_argument("-o", "--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--device", help="device for the speed measurements (default: cuda if present, else cpu)")
    p.set_defaults(func=cmd_experiment)
    p = sub.add_parser("report", help="Markdown and HTML report (plots, tables) of an experiment run folder")
    p.add_argument("run", help="the folder 'quantdeploy experiment' wrote")
    p.set_defaults(func=cmd_report)
