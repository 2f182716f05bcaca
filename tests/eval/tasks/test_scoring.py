"""Standard errors and the paired comparison."""

import math

from hypothesis import given
from hypothesis import strategies as st

from quantdeploy.eval.tasks.scoring import mcnemar_p, mean_and_stderr, paired


@given(st.lists(st.integers(0, 1), min_size=2, max_size=200))
def test_the_standard_error_of_0_1_outcomes_is_the_binomial_one(outcomes):
    mean, se = mean_and_stderr([float(v) for v in outcomes])
    n = len(outcomes)
    assert math.isclose(mean, sum(outcomes) / n)
    assert math.isclose(se, math.sqrt(mean * (1 - mean) / (n - 1)), abs_tol=1e-12)


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_is_symmetric_and_a_probability(b, c):
    p = mcnemar_p(b, c)
    assert p == mcnemar_p(c, b) and 0 < p <= 1
    if b == c:
        assert p == 1.0


def test_mcnemar_known_value():
    # 10 discordant pairs all one way: 2 * 0.5^10
    assert math.isclose(mcnemar_p(0, 10), 2 / 1024)


def test_paired_lists_the_flips_and_the_difference():
    model = [1, 1, 0, 0, 1, 0]
    base = [1, 0, 1, 0, 1, 1]
    r = paired(model, base)
    assert r["gained"] == [1] and r["lost"] == [2, 5] and r["flips"] == 3
    assert math.isclose(r["flip_rate"], 0.5) and math.isclose(r["diff"], -1 / 6)
    assert math.isclose(r["diff_stderr"], mean_and_stderr([0, 1, -1, 0, 0, -1])[1])


def test_identical_models_have_no_flips():
    r = paired([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert r["flips"] == 0 and r["diff"] == 0 and r["mcnemar_p"] == 1.0
