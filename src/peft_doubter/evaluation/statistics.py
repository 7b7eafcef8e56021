"""Statistics for comparing abstainers on the same questions: Wilson intervals, percentile and paired bootstraps
over questions (also stratified, for cross-fitted scores), McNemar's test. Only numpy and the standard library."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike


def _as_correct(correct: ArrayLike) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("`correct` must be a non-empty 1-D array.")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("`correct` must contain only booleans or 0/1.")
    return arr.astype(bool)




class McNemarResult(NamedTuple):
    statistic: float
    pvalue: float


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``; ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"Need 0 <= k <= n, got k={k}, n={n}.")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _resamples(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index vectors (questions drawn with replacement), one at a time to bound memory."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield rng.integers(0, n, size=n)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(*arrays)``, resampling questions (rows of every array jointly).

    Resamples where the metric is undefined (NaN, e.g. AUROC with one class) are dropped.
    """
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError("All arrays passed to `bootstrap_ci` must have the same length.")
    stats = np.array([metric_fn(*(a[i] for a in arrs)) for i in _resamples(n, n_resamples, seed)])
    return _percentile_interval(stats, alpha)


def paired_bootstrap_diff(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    correct: ArrayLike,
    conf_a: ArrayLike,
    conf_b: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of ``metric_fn(correct, conf_a) - metric_fn(correct, conf_b)`` on the same questions.

    Returns ``diff`` (on the full data), ``ci_low``/``ci_high`` (percentile interval) and ``pvalue``, the
    two-sided bootstrap p-value ``min(1, 2 * min(P*(diff <= 0), P*(diff >= 0)))``.
    """
    corr = _as_correct(correct)
    a = np.asarray(conf_a, dtype=np.float64)
    b = np.asarray(conf_b, dtype=np.float64)
    if a.shape != corr.shape or b.shape != corr.shape:
        raise ValueError("`correct`, `conf_a` and `conf_b` must have the same shape.")
    resamples = _resamples(corr.size, n_resamples, seed)
    diffs = np.array([metric_fn(corr[i], a[i]) - metric_fn(corr[i], b[i]) for i in resamples])
    return _difference(float(metric_fn(corr, a) - metric_fn(corr, b)), diffs, alpha)


def _difference(diff: float, resampled: np.ndarray, alpha: float) -> dict[str, float]:
    """A difference on the full data with the percentile interval and two-sided p-value of its resamples."""
    low, high = _percentile_interval(resampled, alpha)
    finite = resampled[np.isfinite(resampled)]
    pvalue = min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))) if finite.size else math.nan
    return {"diff": diff, "ci_low": low, "ci_high": high, "pvalue": float(pvalue)}


def stratified_paired_bootstrap_diff(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    correct: ArrayLike,
    conf_a: ArrayLike,
    conf_b: ArrayLike,
    strata: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Like :func:`paired_bootstrap_diff` for the mean over strata of the per-stratum metric (e.g. the folds of a
    cross-fitting, whose scores come from different models and are comparable only within a fold): questions are
    resampled within each stratum. Returns ``diff`` (mean over strata of metric(a) - metric(b) on the full data),
    ``ci_low``/``ci_high`` and ``pvalue`` as :func:`paired_bootstrap_diff` does."""
    corr = _as_correct(correct)
    a, b, groups = np.asarray(conf_a, dtype=np.float64), np.asarray(conf_b, dtype=np.float64), np.asarray(strata)
    if a.shape != corr.shape or b.shape != corr.shape or groups.shape != corr.shape:
        raise ValueError("`correct`, `conf_a`, `conf_b` and `strata` must have the same shape.")
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]

    def mean_diff(parts: list[np.ndarray]) -> float:
        return float(np.mean([metric_fn(corr[i], a[i]) - metric_fn(corr[i], b[i]) for i in parts]))

    rng = np.random.default_rng(seed)
    diffs = np.array([mean_diff([rng.choice(m, size=m.size) for m in members]) for _ in range(n_resamples)])
    return _difference(mean_diff(members), diffs, alpha)


def mcnemar(a_correct: ArrayLike, b_correct: ArrayLike, exact_below: int = 25) -> McNemarResult:
    """McNemar test that two methods, judged on the same questions, have the same accuracy.

    With ``b`` = questions only A got right and ``c`` = only B got right: if ``b + c < exact_below`` the exact
    two-sided binomial test (statistic ``min(b, c)``); otherwise the chi-square test with continuity correction,
    statistic ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.
    """
    a = _as_correct(a_correct)
    b_arr = _as_correct(b_correct)
    if a.shape != b_arr.shape:
        raise ValueError("`a_correct` and `b_correct` must have the same shape.")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    m = b + c
    if m == 0:
        return McNemarResult(0.0, 1.0)
    if m < exact_below:
        tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2.0**m
        return McNemarResult(float(min(b, c)), min(1.0, 2.0 * tail))
    statistic = (abs(b - c) - 1.0) ** 2 / m
    return McNemarResult(statistic, math.erfc(math.sqrt(statistic / 2.0)))
