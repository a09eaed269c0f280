"""Significance tests against scipy's paired t-test, and the randomization test against the t-test."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from pipeline.significance import (
    paired_t_test,
    randomization_test,
    regularized_incomplete_beta,
    seed_summary,
    student_t_two_sided_p,
)


def _scores(seed, n, effect=0.0):
    """Per-query scores of two systems: shared query difficulty, noise, and a mean effect."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    return difficulty + effect + 0.1 * rng.standard_normal(n), difficulty + 0.1 * rng.standard_normal(n)


@pytest.mark.parametrize("n", [3, 4, 10, 50, 300])
@pytest.mark.parametrize("seed", range(4))
def test_paired_t_test_equals_scipy(seed, n):
    a, b = _scores(seed, n, effect=0.03 * seed)
    mean, t, p = paired_t_test(a, b)
    reference = stats.ttest_rel(a, b)
    assert mean == pytest.approx(np.mean(a - b), rel=1e-12)
    assert t == pytest.approx(reference.statistic, rel=1e-10)
    assert p == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, 40.0])
@pytest.mark.parametrize("df", [1, 2, 5, 29, 299, 100_000])
def test_student_t_p_equals_scipy_over_a_wide_range(t, df):
    assert student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)


@pytest.mark.parametrize("t", [0.0, 1e-8, 0.3, 1.0, 7.0, 1e6, 1e100])
def test_student_t_p_closed_forms_for_one_and_two_df(t):
    # df = 1 is Cauchy: p = 2 atan(1 / t) / pi; df = 2: p = 1 - t / r = 2 / (r (r + t)), r = sqrt(2 + t^2)
    r = math.hypot(math.sqrt(2), t)
    assert student_t_two_sided_p(t, 1) == pytest.approx(2 * math.atan2(1, t) / math.pi, rel=1e-12)
    assert student_t_two_sided_p(t, 2) == pytest.approx(2 / (r * (r + t)), rel=1e-12)
    assert student_t_two_sided_p(-t, 5) == student_t_two_sided_p(t, 5)
    assert student_t_two_sided_p(math.inf, 5) == 0.0


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (2.0, 3.0), (0.5, 149.5), (30.0, 0.5), (1.0, 1.0)])
def test_regularized_incomplete_beta_equals_scipy(a, b):
    for x in (0.0, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0):
        assert regularized_incomplete_beta(a, b, x) == pytest.approx(stats.beta.cdf(x, a, b), rel=1e-9, abs=1e-15)


def test_clear_effect_is_significant_and_no_effect_is_not():
    a, b = _scores(0, 300, effect=0.05)
    assert paired_t_test(a, b)[2] < 1e-3
    assert randomization_test(a, b) < 1e-3
    a, b = _scores(1, 300)
    assert paired_t_test(a, b)[2] > 0.05
    assert randomization_test(a, b) > 0.05


@pytest.mark.parametrize("seed", range(3))
def test_randomization_p_close_to_t_test_p_on_normal_data(seed):
    a, b = _scores(seed, 300, effect=0.01)  # differences are normal: both tests estimate one p
    p_t = paired_t_test(a, b)[2]
    assert 0.001 < p_t < 0.999  # a p-value in the range where the comparison means something
    assert randomization_test(a, b, trials=10_000, seed=seed) == pytest.approx(p_t, abs=0.02)


def test_randomization_test_is_deterministic_per_seed_and_bounded():
    a, b = _scores(2, 300, effect=0.01)
    assert randomization_test(a, b, seed=3) == randomization_test(a, b, seed=3)
    assert randomization_test(a, b, trials=500, seed=1) != randomization_test(a, b, trials=500, seed=2)
    # the observed assignment counts: p never reaches 0
    assert randomization_test(a + 10.0, b, trials=99) == pytest.approx(1 / 100)


def test_randomization_test_counts_ties_that_differ_only_by_rounding():
    # d = (0.1, 0.2, -0.3, 0.5): flipping the first three keeps |sum d| = 0.5 exactly, but in
    # floats 0.5 and -0.1 - 0.2 + 0.3 + 0.5 differ in the last bit.
    a, b = [0.3, 0.5, 0.2, 0.9], [0.2, 0.3, 0.5, 0.4]
    d = [Fraction(x) for x in ("0.1", "0.2", "-0.3", "0.5")]
    flips = list(itertools.product((-1, 1), repeat=4))
    exact = sum(abs(sum(e * x for e, x in zip(signs, d))) >= abs(sum(d)) for signs in flips) / len(flips)
    assert exact == 10 / 16
    assert randomization_test(a, b, trials=20_000) == pytest.approx(exact, abs=0.02)


def test_zero_variance():
    a = np.array([0.1, 0.2, 0.3])
    assert paired_t_test(a, a) == (0.0, 0.0, 1.0)
    assert randomization_test(a, a) == 1.0
    mean, t, p = paired_t_test(a + 0.1, a)  # all differences equal (up to rounding, so not exact)
    assert p == pytest.approx(0.0, abs=1e-9) and abs(t) > 1e6
    mean, t, p = paired_t_test([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # exactly equal differences
    assert (mean, t, p) == (0.25, math.inf, 0.0)
    mean, t, p = paired_t_test([0.25, 0.25], [0.5, 0.5])
    assert (mean, t, p) == (-0.25, -math.inf, 0.0)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([0.1, 0.2, 0.3], [0.1, 0.2], "same queries"),
        ([0.1], [0.2], "at least 2 queries"),
        ([], [], "at least 2 queries"),
        ([[0.1, 0.2]], [[0.1, 0.2]], "1-D"),
        ([0.1, math.nan], [0.1, 0.2], "finite"),
    ],
)
def test_bad_inputs_raise(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_t_test(a, b)
    with pytest.raises(ValueError, match=message):
        randomization_test(a, b)


def test_randomization_test_rejects_no_trials():
    with pytest.raises(ValueError, match="trials"):
        randomization_test([0.1, 0.2], [0.2, 0.3], trials=0)


def test_seed_summary():
    values = [0.31, 0.35, 0.33, 0.30]
    summary = seed_summary(values)
    assert summary["n"] == 4
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert seed_summary(np.array([0.4])) == {"mean": 0.4, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="non-empty"):
        seed_summary([])
