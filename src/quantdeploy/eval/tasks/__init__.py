"""Task evaluations: what quantization costs on multiple choice, arithmetic and code, item by item.

A task is named on the command line (``quantdeploy eval MODEL --task NAME_OR_FILE``): ``humaneval``, or
a BIG-bench JSON task file (or its folder) in BIG-bench's schema (``bigbench.py``). Every task yields,
per model, a list of per-item outcomes for each metric, so that the summary (mean ± standard error,
``scoring.py``) and the comparison with the original model on the same items (flips, McNemar) come
from the same numbers:

- multiple choice: ``acc`` (the choice with the highest summed log-probability is a correct one) and
  ``acc_norm`` (the same with the sum divided by the choice's length in UTF-8 bytes, as
  lm-evaluation-harness normalizes), both reported;
- exact match: the greedy generation's answer (``bigbench.extract_answer``) equals a target;
- humaneval: pass@1 greedy, and pass@k with sampling (``humaneval.py``).

Models are ``TaskModel``s (``lm.py``): log-likelihoods through the model's forward pass, generation
through our engine where it serves the architecture.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import DataError
from quantdeploy.eval.tasks import bigbench, humaneval
from quantdeploy.eval.tasks.lm import TaskModel
from quantdeploy.eval.tasks.sandbox import SandboxLimits
from quantdeploy.eval.tasks.scoring import mean_and_stderr, paired

BUILTIN = ("humaneval",)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    shots: int | None = None  # None: the task kind's default (bigbench.read_task)
    limit: int | None = None  # the first N items only
    seed: int = 0
    max_tokens: int = 16  # exact-match answers
    code_max_tokens: int = 384  # HumanEval completions
    samples: int = 1  # HumanEval completions per problem for pass@k (1: greedy pass@1 only)
    k: tuple[int, ...] = (1, 10)
    temperature: float = 0.8
    sandbox: SandboxLimits = SandboxLimits()


def check_task(spec: str) -> None:
    """Fail with one line before any model loads if ``spec`` names no task."""
    if spec in BUILTIN:
        if spec == "humaneval":
            humaneval.read_problems(limit=1)
        return
    path = Path(spec)
    if not (path.is_file() or (path / "task.json").is_file()):
        raise DataError(f"task '{spec}' is neither a built-in task ({', '.join(BUILTIN)}) nor a BIG-bench task.json "
                        "(or a folder holding one)")


def run_task(spec: str, model: TaskModel, options: TaskOptions = TaskOptions()) -> dict[str, Any]:
    """Per-item outcomes of ``model`` on the task ``spec``: ``{"task", "kind", "n", "outcomes": {metric:
    [per item]}, ...}``."""
    if spec == "humaneval":
        problems = humaneval.read_problems(options.limit)
        out = humaneval.evaluate(model, problems, options.samples, options.k, options.temperature,
                                 max_tokens=options.code_max_tokens, seed=options.seed, limits=options.sandbox)
        return {"task": "humaneval", "kind": "humaneval", "n": len(problems), "shots": 0,
                "generator": model.generator, **out}
    task = bigbench.read_task(spec, options.shots, options.limit, options.seed)
    result = {"task": task.name, "kind": task.kind, "n": len(task.items), "shots": task.shots, "source": task.source}
    if task.kind == "multiple_choice":
        acc, acc_norm = [], []
        for item in task.items:
            scores = model.loglikelihoods(item.prompt, list(item.choices))
            raw = [s for s, _, _ in scores]
            norm = [s / max(1, len(c.encode("utf-8"))) for (s, _, _), c in zip(scores, item.choices)]
            acc.append(float(raw.index(max(raw)) in item.correct))
            acc_norm.append(float(norm.index(max(norm)) in item.correct))
        result["outcomes"] = {"acc": acc, "acc_norm": acc_norm}
        return result
    params = SamplingParams(max_tokens=options.max_tokens, stop=task.stop)
    texts = model.generate([item.prompt for item in task.items], params)
    answers = [bigbench.extract_answer(t, task.output_regex) for t in texts]
    result["outcomes"] = {"exact_match": [float(a in item.targets) for a, item in zip(answers, task.items)]}
    result.update(generator=model.generator, answers=answers, answer_rule=f"first match of {task.output_regex!r}"
                  if task.output_regex else "the generated line, stripped")
    return result


def summarize(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per metric: mean ± standard error, and against ``baseline`` (the original model's result on
    the same task) the paired difference, flips and McNemar's p."""
    rows = []
    for metric, outcomes in result["outcomes"].items():
        mean, se = mean_and_stderr(outcomes)
        row = {"task": result["task"], "metric": metric, "n": len(outcomes), "score": mean, "stderr": se}
        if baseline is not None:
            base = baseline["outcomes"][metric]
            base_mean, base_se = mean_and_stderr(base)
            row.update(baseline=base_mean, baseline_stderr=base_se, **paired(outcomes, base))
        rows.append(row)
    return rows
