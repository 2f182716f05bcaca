"""BIG-bench JSON tasks: prompts as BIG-bench formats them, choices, targets, shots, and clear errors."""

import json

import pytest

from quantdeploy.errors import DataError
from quantdeploy.eval.tasks.bigbench import extract_answer, read_task


def write(tmp_path, task):
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    return path


MC = {"name": "mc", "examples": [
    {"input": f"question {i}?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(6)]}


def test_multiple_choice_with_the_default_prefixes(tmp_path):
    task = read_task(write(tmp_path, MC))
    assert task.kind == "multiple_choice" and task.shots == 0 and len(task.items) == 6
    item = task.items[1]
    assert item.prompt == "\nQ: question 1?\n  choice: yes\n  choice: no\nA: "
    assert item.choices == ("yes", "no") and item.correct == {1}


def test_the_task_s_own_prefixes_and_no_appended_choices(tmp_path):
    task = read_task(write(tmp_path, {**MC, "task_prefix": "Answer.\n", "example_input_prefix": "In: ",
                                      "example_output_prefix": " Out:", "append_choices_to_input": False}))
    assert task.items[0].prompt == "Answer.\nIn: question 0? Out:"


def test_shots_come_from_other_examples_with_their_answers_and_are_reproducible(tmp_path):
    path = write(tmp_path, MC)
    task = read_task(path, shots=2, seed=3)
    for i, item in enumerate(task.items):
        assert item.prompt.count("\nQ: ") == 3 and item.prompt.endswith(f"\nQ: question {i}?\n  choice: yes\n  choice: no\nA: ")
        assert item.prompt.count(f"question {i}?") == 1  # never its own answer as a shot
        assert item.prompt.count("A: yes") + item.prompt.count("A: no") == 2
    assert read_task(path, shots=2, seed=3) == task and read_task(path, shots=2, seed=4) != task


def test_an_exact_match_task_gets_targets_three_shots_and_the_regex(tmp_path):
    examples = [{"input": f"What is {i} plus 1?", "target": str(i + 1), "target_scores": {str(i + 1): 1}}
                for i in range(10)]
    task = read_task(write(tmp_path, {"name": "add", "preferred_score": "exact_str_match",
                                      "output_regex": r"[-+]?\d+", "examples": examples}), limit=4)
    assert task.kind == "exact_match" and task.shots == 3 and len(task.items) == 4
    assert task.items[2].targets == ("3",) and task.items[2].prompt.endswith("\nQ: What is 2 plus 1?\nA: ")
    assert extract_answer(" 3 apples", task.output_regex) == "3"
    assert extract_answer("no number", task.output_regex) == ""
    assert extract_answer("  yes \n", None) == "yes"


def test_the_bundled_task_files_read(data):
    for name in ("general_knowledge", "misconceptions", "code_line_description", "arithmetic/2_digit_addition"):
        task = read_task(data / "tasks" / name, limit=3)
        assert len(task.items) == 3


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json", "is not JSON"),
    ({"examples": []}, "no 'examples'"),
    ({"examples": [{"input": "x"}]}, "example 0 needs"),
    ({"examples": [{"input": "x", "target": "y"}]}, "needs 'target_scores'"),
])
def test_bad_task_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "task.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message):
        read_task(path)


def test_more_shots_than_examples_is_an_error(tmp_path):
    with pytest.raises(DataError, match="shots need"):
        read_task(write(tmp_path, MC), shots=6)
