"""Significance of a difference between two systems on the same queries, and spread over seeds.

``a`` and ``b`` are per-query scores (e.g. nDCG@10) of two systems on the same queries, in the
same order. Both tests are two-sided and paired, as in ranx's ``compare`` (Smucker et al., "A
Comparison of Statistical Significance Tests for Information Retrieval Evaluation", CIKM 2007).
Pure numpy and ``math``: the Student t distribution comes from the regularized incomplete beta
function, so scipy is only needed by the tests.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_CHUNK_ELEMENTS = 1 << 20  # sign flips drawn per chunk of the randomization test (8 MiB)


def _paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """``a - b`` as a checked (n,) float64 array: 1-D, same length, finite, n >= 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"per-query scores must be 1-D arrays, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same queries: {len(a)} scores against {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired test needs at least 2 queries, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-query scores must be finite (found NaN or inf)")
    return a - b  # (n,)


def _continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for ``I_x(a, b)`` (Numerical Recipes ``betacf``)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    # Converges in O(sqrt(max(a, b))) terms when x < (a + 1) / (a + b + 2), as the caller ensures.
    for m in range(1, 100_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)``, the CDF of a Beta(a, b) variable at ``x``.

    Continued fraction on whichever side converges fast, using ``I_x(a, b) = 1 - I_{1-x}(b, a)``
    (Press et al., Numerical Recipes, 3rd ed., section 6.4).

    >>> round(regularized_incomplete_beta(2.0, 3.0, 0.4), 12)  # 1 - (1-x)^4 - 4 x (1-x)^3
    0.5248
    >>> round(regularized_incomplete_beta(0.5, 0.5, 0.5), 12)
    0.5
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    return _incomplete_beta(a, b, x, 1.0 - x)


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """``I_x(a, b)`` given both ``x`` and ``y = 1 - x``, so a caller can pass each accurately."""
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log(y) - log_beta)  # x^a y^b / B(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, y) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``.

    >>> round(student_t_two_sided_p(2.0, 10), 6)
    0.073388
    >>> student_t_two_sided_p(0.0, 5)
    1.0
    """
    t2 = t * t
    if math.isinf(t2):
        return 0.0
    # Both x and 1 - x from t: 1 - x, computed by subtraction, would lose the p-values near 1.
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Two-sided paired Student's t-test of ``mean(a - b) = 0`` over per-query scores.

    ``d_i = a_i - b_i``,  ``t = mean(d) / (std(d, ddof=1) / sqrt(n))``,
    ``p = P(|T_{n-1}| >= |t|)``

    When every ``d_i`` is equal the variance is 0: ``t = 0, p = 1`` if they are all 0, else
    ``t = +-inf, p = 0``.

    Args:
        a, b: (n,) scores of two systems on the same n >= 2 queries, same order.

    Returns:
        ``(mean_difference, t_statistic, p_value)``.

    Raises:
        ValueError: on shapes that differ or are not 1-D, n < 2, or non-finite scores.

    Reference: Smucker, Allan and Carterette, CIKM 2007; ranx's default test.

    >>> mean, t, p = paired_t_test([0.5, 0.6, 0.7, 0.8], [0.4, 0.6, 0.5, 0.6])
    >>> round(mean, 3), round(t, 4), round(p, 4)
    (0.125, 2.6112, 0.0796)
    """
    d = _paired_differences(a, b)  # (n,)
    mean = float(d.mean())
    if (d == d[0]).all():  # exact check: a rounded std of equal values may not be exactly 0
        return (mean, 0.0, 1.0) if d[0] == 0.0 else (mean, math.copysign(math.inf, mean), 0.0)
    n = len(d)
    t = mean / (float(d.std(ddof=1)) / math.sqrt(n))
    return mean, t, student_t_two_sided_p(t, n - 1)


def randomization_test(a: Sequence[float], b: Sequence[float], trials: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomization (sign-flip) test of ``mean(a - b) = 0``.

    Under the null each ``d_i = a_i - b_i`` is as likely to have either sign, so each trial flips
    the signs at random (``e_i = +-1`` with probability 1/2):

    ``p = (#{trials with |mean(e * d)| >= |mean(d)|} + 1) / (trials + 1)``

    The ``+ 1`` counts the observed assignment, so ``p > 0`` and the test stays valid.
    Deterministic for a given ``(a, b, trials, seed)``.

    Args:
        a, b: (n,) scores of two systems on the same n >= 2 queries, same order.
        trials: number of random sign assignments.
        seed: seed of numpy's ``default_rng``.

    Returns:
        p-value in ``[1 / (trials + 1), 1]``.

    Reference: Fisher, "The Design of Experiments", 1935; Smucker, Allan and Carterette, CIKM 2007.

    >>> p = randomization_test([0.5, 0.6, 0.7, 0.8], [0.4, 0.6, 0.5, 0.6], trials=1000)
    >>> round(p, 3)  # the exact test: 4 of the 16 sign assignments reach |sum d| = 0.5
    0.252
    >>> randomization_test([0.3, 0.4], [0.3, 0.4])
    1.0
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    d = _paired_differences(a, b)  # (n,)
    n = len(d)
    observed = abs(d.sum())
    # Sums equal in exact arithmetic (ties are common with discrete metrics) can differ by rounding.
    tolerance = 1e-9 * float(np.abs(d).sum())
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    at_least_as_extreme = 0
    for start in range(0, trials, rows):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(min(rows, trials - start), n))  # (k, n)
        at_least_as_extreme += int((np.abs(signs @ d) >= observed - tolerance).sum())
    return (at_least_as_extreme + 1) / (trials + 1)


def seed_summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation of one metric over training seeds.

    ``mean = sum_i v_i / n``,  ``std = sqrt(sum_i (v_i - mean)^2 / (n - 1))``  (0.0 when n = 1)

    >>> seed_summary([0.25, 0.5, 0.75])
    {'mean': 0.5, 'std': 0.25, 'n': 3}
    >>> seed_summary([0.5])
    {'mean': 0.5, 'std': 0.0, 'n': 1}
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"seed_summary needs a non-empty 1-D sequence, got shape {values.shape}")
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": len(values)}
