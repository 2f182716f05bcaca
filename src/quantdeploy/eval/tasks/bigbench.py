"""BIG-bench JSON tasks: read one ``task.json`` into prompts, choices and targets.

The schema is BIG-bench's (``bigbench/api/json_task.py``): ``examples`` each with ``input`` and either
``target_scores`` (multiple choice: the choices with the highest score are correct) or ``target`` (a
string or a list of acceptable strings), plus optional ``task_prefix``, ``example_input_prefix``
(default ``"\\nQ: "``), ``example_output_prefix`` (``"\\nA: "``), ``choice_prefix`` (``"\\n  choice: "``),
``append_choices_to_input`` (true), ``few_shot_example_separator`` (``"\\n"``), ``output_regex`` and
``preferred_score``. A task whose ``preferred_score`` is ``exact_str_match`` (and whose examples have a
``target``) is a generation task; any other is multiple choice.

A prompt is ``task_prefix``, then the shots (each a formatted example followed by its answer) joined by
the separator, the separator, and the formatted query: ``example_input_prefix + input`` (+ the choices
when they are appended) ``+ example_output_prefix``. Shots come from the task's own examples, never the
query itself, chosen by a seeded generator per query, so the same (task, shots, seed) gives the same
prompts everywhere. What is scored (``tasks/__init__.py``): a choice's log-probability as the
continuation of the prompt, or the generated text's answer against the targets.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from quantdeploy.errors import DataError


@dataclasses.dataclass(frozen=True)
class Item:
    """One query: its prompt and either choices (with the correct ones) or acceptable targets."""

    prompt: str
    choices: tuple[str, ...] = ()
    correct: frozenset[int] = frozenset()
    targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # multiple_choice | exact_match
    items: tuple[Item, ...]
    source: str
    shots: int
    output_regex: str | None = None
    stop: tuple[str, ...] = ("\n",)  # a generated answer ends at the end of its line


def read_task(path: str | Path, shots: int | None = None, limit: int | None = None, seed: int = 0) -> Task:
    """``path`` (a ``task.json`` or its folder) as a :class:`Task`; ``shots`` defaults to 0 for multiple
    choice and 3 for exact match; ``limit`` keeps the first examples (in file order)."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"task file {path} does not exist; pass a BIG-bench task.json or its folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"task file {path} is not JSON ({err}); pass a BIG-bench task.json") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples or not isinstance(examples, list):
        raise DataError(f"task file {path} has no 'examples' list; is it a BIG-bench JSON task?")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or not ("target_scores" in ex or "target" in ex):
            raise DataError(f"task file {path}: example {i} needs 'input' and 'target_scores' or 'target'")
    generation = data.get("preferred_score") == "exact_str_match" and all("target" in ex for ex in examples)
    if not generation and not all("target_scores" in ex for ex in examples):
        raise DataError(f"task file {path}: a multiple-choice task needs 'target_scores' in every example")
    kind = "exact_match" if generation else "multiple_choice"
    shots = (3 if generation else 0) if shots is None else shots
    if shots >= len(examples):
        raise DataError(f"task file {path} has {len(examples)} examples; {shots} shots need at least {shots + 1}")
    fmt = _Format.from_task(data)
    chosen = examples[:limit] if limit else examples
    items = []
    for i, ex in enumerate(chosen):
        rng = random.Random(f"{seed}:{i}")
        others = [j for j in rng.sample(range(len(examples)), min(len(examples), shots + 1)) if j != i][:shots]
        shot_text = [fmt.query(examples[j], generation) + _answer(examples[j]) for j in others]
        prompt = fmt.prefix + "".join(s + fmt.separator for s in shot_text) + fmt.query(ex, generation)
        if generation:
            targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
            items.append(Item(prompt, targets=tuple(str(t) for t in targets)))
        else:
            choices, correct = _choices(ex)
            items.append(Item(prompt, choices=choices, correct=correct))
    return Task(str(data.get("name") or path.parent.name), kind, tuple(items), str(path), shots,
                data.get("output_regex"))


@dataclasses.dataclass(frozen=True)
class _Format:
    prefix: str
    input_prefix: str
    output_prefix: str
    choice_prefix: str
    append_choices: bool
    separator: str

    @classmethod
    def from_task(cls, data: dict[str, Any]) -> "_Format":
        return cls(data.get("task_prefix", ""), data.get("example_input_prefix", "\nQ: "),
                   data.get("example_output_prefix", "\nA: "), data.get("choice_prefix", "\n  choice: "),
                   bool(data.get("append_choices_to_input", True)), data.get("few_shot_example_separator", "\n"))

    def query(self, ex: dict[str, Any], generation: bool) -> str:
        text = self.input_prefix + ex["input"]
        if not generation and self.append_choices:
            text += "".join(self.choice_prefix + c for c in ex["target_scores"])
        return text + self.output_prefix


def _choices(ex: dict[str, Any]) -> tuple[tuple[str, ...], frozenset[int]]:
    scores = ex["target_scores"]
    choices = tuple(scores)
    best = max(scores.values())
    return choices, frozenset(i for i, c in enumerate(choices) if scores[c] == best)


def _answer(ex: dict[str, Any]) -> str:
    if "target_scores" in ex and "target" not in ex:
        scores = ex["target_scores"]
        return max(scores, key=scores.get)
    target = ex["target"]
    return str(target[0] if isinstance(target, list) else target)


def extract_answer(text: str, output_regex: str | None) -> str:
    """The answer in a generation, by the stated rule: the first match of the task's ``output_regex``
    (BIG-bench's rule; arithmetic tasks give ``[-+]?\\d+``) if it has one, else the text stripped of
    surrounding whitespace. An answer with no match is the empty string (never correct)."""
    if output_regex:
        found = re.search(output_regex, text)
        return found.group(0) if found else ""
    return text.strip()
