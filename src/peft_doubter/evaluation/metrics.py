"""Honest selective-prediction metrics for abstainers.

Conventions used throughout:

* ``correct``: bool array, the oracle: was the base model's pass-1 answer correct.
* ``confidence``: float array, higher means "more likely correct"; a selective predictor answers the most
  confident questions first and abstains on the lowest. Ranking metrics accept any real scores (e.g. log-odds).
* ``action``: the Doubter's text behaviour per question, one of ``"answered"`` (wrote an answer, the base's or
  another), ``"declined"`` (wrote the refusal) or ``"corrected"`` (wrote the self-correction). A declined question
  and a question answered differently are never merged, and written answers are judged on their own text.

Ties in ``confidence`` are broken by expectation over a uniformly random order inside each tie group, so every
metric is deterministic and invariant to how tied questions are ordered in the input.

Only numpy and the standard library are used, so this module is safe to import from the core package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .statistics import (
    _as_correct,
    _percentile_interval,
    _resamples,
    mcnemar,
    wilson_interval,
)


ACTIONS = ("answered", "declined", "corrected")


def _as_pair(correct: ArrayLike, confidence: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    corr = _as_correct(correct)
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != corr.shape:
        raise ValueError(f"`confidence` has shape {conf.shape} but `correct` has shape {corr.shape}.")
    if not np.isfinite(conf).all():
        raise ValueError("`confidence` must be finite (no NaN or inf).")
    return corr, conf


def _check_unit_interval(conf: np.ndarray) -> None:
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("`confidence` must lie in [0, 1] for calibration metrics (ECE, Brier).")


def _expected_errors_at_k(correct: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Expected number of errors among the k most confident questions, for k = 1..n.

    Inside a tie group the errors are spread uniformly (the expectation over a random order of the ties).
    """
    n = correct.size
    _, group, counts = np.unique(-confidence, return_inverse=True, return_counts=True)  # descending confidence
    errors = np.bincount(group, weights=~correct, minlength=counts.size)
    start = np.cumsum(counts) - counts
    errors_before = np.cumsum(errors) - errors
    g = np.repeat(np.arange(counts.size), counts)  # group of the k-th answered question
    j = np.arange(1, n + 1) - start[g]  # its position inside the group, 1-based
    return errors_before[g] + j * errors[g] / counts[g]


def _oracle_errors_at_k(correct: np.ndarray) -> np.ndarray:
    """Errors among the top k when every correct question is ranked above every wrong one."""
    k = np.arange(1, correct.size + 1)
    return np.maximum(0, k - int(correct.sum())).astype(np.float64)


def _k_for_coverage(coverage: float, n: int) -> int:
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"`coverage` must be in (0, 1], got {coverage}.")
    return max(1, math.ceil(round(coverage * n, 9)))


# ----------------------------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------------------------


def risk_coverage_curve(correct: ArrayLike, confidence: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Risk–coverage curve: answer questions in descending confidence, one tie group at a time.

    Returns ``(coverages, risks)`` with one point per distinct confidence value: coverage is the fraction of
    questions whose confidence is >= that value, risk the error rate among them.
    """
    corr, conf = _as_pair(correct, confidence)
    _, group, counts = np.unique(-conf, return_inverse=True, return_counts=True)
    errors = np.bincount(group, weights=~corr, minlength=counts.size)
    answered = np.cumsum(counts)
    return answered / corr.size, np.cumsum(errors) / answered


def _areas(corr: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Expected errors at each k, plus AURC, E-AURC and PRR computed from them with one sort."""
    n = corr.size
    k = np.arange(1, n + 1)
    errors = _expected_errors_at_k(corr, conf)
    area = float(np.mean(errors / k))
    oracle_area = float(np.mean(_oracle_errors_at_k(corr) / k))
    random_area = 1.0 - float(corr.mean())  # a random ranking has the base error rate at every coverage
    prr_value = (random_area - area) / (random_area - oracle_area) if 0.0 < random_area < 1.0 else math.nan
    return errors, {"aurc": area, "eaurc": area - oracle_area, "prr": prr_value}


def aurc(correct: ArrayLike, confidence: ArrayLike) -> float:
    """Area under the risk–coverage curve: ``mean_k risk(top-k)`` over k = 1..n (Geifman et al., 2019)."""
    return _areas(*_as_pair(correct, confidence))[1]["aurc"]


def eaurc(correct: ArrayLike, confidence: ArrayLike) -> float:
    """Excess AURC: ``aurc`` minus the AURC of the oracle ranking (all correct answers first)."""
    return _areas(*_as_pair(correct, confidence))[1]["eaurc"]


def auroc(correct: ArrayLike, confidence: ArrayLike) -> float:
    """P(confidence of a correct question > that of a wrong one), ties counted 1/2; NaN if a class is absent."""
    corr, conf = _as_pair(correct, confidence)
    n_pos = int(corr.sum())
    n_neg = corr.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(conf, return_inverse=True, return_counts=True)
    average_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((average_rank[corr].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def prr(correct: ArrayLike, confidence: ArrayLike) -> float:
    """Prediction rejection ratio ``(AUC_random - AUC_model) / (AUC_random - AUC_oracle)`` over the full rejection
    curve (0 to 100% rejected; LM-Polygraph papers often cap it at 50% rejection, which gives other numbers).

    The rejection curve is the error rate of the kept questions as the least confident ones are rejected, i.e.
    the risk–coverage curve (as in LM-Polygraph), so the areas are AURCs: ``AUC_random`` is the base error rate,
    ``AUC_oracle`` the oracle AURC. 1 is the oracle, 0 random, negative worse than random; NaN when all answers
    are right or all wrong. (Malinin's variant, errors kept divided by n, equals ``2 * AUROC - 1`` for 0/1
    correctness and would add nothing.)
    """
    return _areas(*_as_pair(correct, confidence))[1]["prr"]


def selective_accuracy_at_coverage(
    correct: ArrayLike, confidence: ArrayLike, coverage: float
) -> float:
    """Accuracy on the ``ceil(coverage * n)`` most confident questions (ties at the cut in expectation)."""
    corr, conf = _as_pair(correct, confidence)
    k = _k_for_coverage(coverage, corr.size)
    return float(1.0 - _expected_errors_at_k(corr, conf)[k - 1] / k)


# ----------------------------------------------------------------------------------------------------------------
# Threshold and calibration metrics
# ----------------------------------------------------------------------------------------------------------------


def coverage(confidence: ArrayLike, threshold: float) -> float:
    """Fraction of questions answered when answering iff ``confidence >= threshold``."""
    return float(np.mean(np.asarray(confidence, dtype=np.float64) >= threshold))


def selective_accuracy(correct: ArrayLike, confidence: ArrayLike, threshold: float) -> float:
    """Accuracy among questions with ``confidence >= threshold``; NaN when none is answered."""
    corr, conf = _as_pair(correct, confidence)
    answered = conf >= threshold
    return float(corr[answered].mean()) if answered.any() else math.nan


def selective_risk(correct: ArrayLike, confidence: ArrayLike, threshold: float) -> float:
    """Error rate among questions with ``confidence >= threshold``; NaN when none is answered."""
    return 1.0 - selective_accuracy(correct, confidence, threshold)


def ece(correct: ArrayLike, confidence: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins ``[i/B, (i+1)/B)`` (the last one closed).

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|``.
    """
    corr, conf = _as_pair(correct, confidence)
    _check_unit_interval(conf)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=corr, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins))
    return float(gap[counts > 0].sum() / corr.size)


def brier(correct: ArrayLike, confidence: ArrayLike) -> float:
    """Brier score ``mean((confidence - correct)^2)``."""
    corr, conf = _as_pair(correct, confidence)
    _check_unit_interval(conf)
    return float(np.mean((conf - corr) ** 2))


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def _coverage_key(c: float) -> str:
    return f"sel_acc@{100 * c:g}"


def _point_metrics(corr: np.ndarray, conf: np.ndarray, coverages: Sequence[float], n_bins: int,
                   scores: np.ndarray | None = None) -> dict[str, float]:
    ranked = conf if scores is None else scores
    errors, areas = _areas(corr, ranked)
    out = {"accuracy": float(corr.mean()), "auroc": auroc(corr, ranked), **areas}
    out["ece"] = ece(corr, conf, n_bins)
    out["brier"] = brier(corr, conf)
    for c in coverages:
        k = _k_for_coverage(c, corr.size)
        out[_coverage_key(c)] = float(1.0 - errors[k - 1] / k)
    return out


def summarize(
    correct: ArrayLike,
    confidence: ArrayLike,
    coverages: Sequence[float] = (0.2, 0.5, 0.8),
    n_resamples: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    alpha: float = 0.05,
    scores: ArrayLike | None = None,
) -> dict[str, float]:
    """Every ranking and calibration metric with a percentile-bootstrap ``1 - alpha`` interval.

    ``scores`` (any real numbers ordered like ``confidence``, e.g. its log-odds) rank the questions when given, so
    ranking metrics keep their precision where the confidence saturates; ECE and Brier use ``confidence``.

    Flat dict of floats: ``n``, then for each of ``accuracy`` (base accuracy), ``auroc``, ``aurc``, ``eaurc``,
    ``prr``, ``ece``, ``brier`` and ``sel_acc@<100*c>`` for each coverage ``c``: the value on all questions and
    ``<name>_ci_low`` / ``<name>_ci_high`` from ``n_resamples`` resamples of the questions (one shared set of
    resamples for all metrics, seeded by ``seed``).
    """
    corr, conf = _as_pair(correct, confidence)
    _check_unit_interval(conf)
    ranked = None if scores is None else _as_pair(corr, scores)[1]
    point = _point_metrics(corr, conf, coverages, n_bins, ranked)
    resampled = [_point_metrics(corr[i], conf[i], coverages, n_bins, None if ranked is None else ranked[i])
                 for i in _resamples(corr.size, n_resamples, seed)]
    out: dict[str, float] = {"n": corr.size}
    for name, value in point.items():
        low, high = _percentile_interval(np.array([r[name] for r in resampled]), alpha)
        out[name] = value
        out[f"{name}_ci_low"] = low
        out[f"{name}_ci_high"] = high
    return out


def text_behaviour(
    action: ArrayLike,
    correct: ArrayLike,
    written_correct: ArrayLike | None = None,
    answered_same: ArrayLike | None = None,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Metrics of what the Doubter actually wrote, with Wilson ``1 - alpha`` intervals for the proportions.

    ``correct`` is the pass-1 oracle (the base's own answer); ``written_correct[i]`` says whether the text written
    for question i is right, judged on that text (read where ``action[i]`` is ``"answered"`` or ``"corrected"``;
    default: ``correct``, i.e. every answer repeats the base's); ``answered_same[i]`` whether an answered text is the
    base's pass-1 answer. D = declined, A = answered, C = corrected, W = base wrong, R = base right, n = all:

    * ``coverage = (|A| + |C|) / n``: fraction not declined (the Doubter committed to some answer).
    * ``refusal_rate = |D| / n``; ``correction_rate = |C| / n``.
    * ``refusal_precision = |D ∩ W| / |D|``, beside ``refusal_precision_random = |W| / n`` (1 - base accuracy),
      the expected precision of declining questions at random.
    * ``over_refusal = |D ∩ R| / |D|``: the share of declines that threw away a right answer
      (= 1 - refusal precision; the seeds' definition); ``right_declined_rate = |D ∩ R| / |R|``: the share of the
      base's right answers that were declined. The two are different numbers with different names.
    * ``refusal_recall = |D ∩ W| / |W|``.
    * ``correction_accuracy``: right corrections / corrections.
    * ``total_recovery = (|C ∩ W ∩ right| + |D ∩ W|) / |W|``: wrong pass-1 answers that were fixed or withheld.
    * ``selective_accuracy``: right written outputs / non-declined outputs (A and C, each judged on its own text);
      ``kept_accuracy``: the same over A alone.
    * ``answered_differently``: |A whose text is not the base's pass-1 answer|, and how many of those are right.
    * ``rescued`` = base wrong but written right; ``lost`` = base right but declined or written wrong; McNemar's test
      of base accuracy against written accuracy on the same questions (a decline counts as not right).

    A ratio with an empty denominator is NaN.
    """
    corr = _as_correct(correct)
    act = np.asarray(action, dtype=str)
    if act.shape != corr.shape:
        raise ValueError(f"`action` has shape {act.shape} but `correct` has shape {corr.shape}.")
    unknown = set(np.unique(act)) - set(ACTIONS)
    if unknown:
        raise ValueError(f"`action` values must be one of {ACTIONS}, got {sorted(map(str, unknown))}.")
    answered, declined, corrected = (act == a for a in ACTIONS)
    if written_correct is None:
        if corrected.any():
            raise ValueError('`written_correct` is required when some `action` is "corrected".')
        written = corr.copy()
    else:
        written = _as_correct(written_correct)
        if written.shape != corr.shape:
            raise ValueError("`written_correct` must have the same shape as `correct`.")
    same = np.ones_like(corr) if answered_same is None else _as_correct(answered_same)
    wrong = ~corr
    committed = answered | corrected
    right_written = committed & written
    differently = answered & ~same
    test = mcnemar(corr, right_written)

    counts = {
        "n": corr.size,
        "n_answered": int(answered.sum()),
        "n_declined": int(declined.sum()),
        "n_corrected": int(corrected.sum()),
        "n_base_wrong": int(wrong.sum()),
        "answered_differently": int(differently.sum()),
        "answered_differently_right": int((differently & written).sum()),
        "rescued": int((wrong & right_written).sum()),
        "lost": int((corr & ~right_written).sum()),
        "mcnemar_statistic": test.statistic,
        "mcnemar_pvalue": test.pvalue,
    }
    ratios = {
        "coverage": (int(committed.sum()), corr.size),
        "refusal_rate": (int(declined.sum()), corr.size),
        "correction_rate": (int(corrected.sum()), corr.size),
        "refusal_precision": (int((declined & wrong).sum()), int(declined.sum())),
        "refusal_precision_random": (int(wrong.sum()), corr.size),
        "over_refusal": (int((declined & corr).sum()), int(declined.sum())),
        "right_declined_rate": (int((declined & corr).sum()), int(corr.sum())),
        "refusal_recall": (int((declined & wrong).sum()), int(wrong.sum())),
        "correction_accuracy": (int((corrected & written).sum()), int(corrected.sum())),
        "total_recovery": (int((corrected & wrong & written).sum() + (declined & wrong).sum()), int(wrong.sum())),
        "selective_accuracy": (int(right_written.sum()), int(committed.sum())),
        "kept_accuracy": (int((answered & written).sum()), int(answered.sum())),
        "written_accuracy": (int(right_written.sum()), corr.size),
    }
    out: dict[str, float] = dict(counts)
    for name, (k, n) in ratios.items():
        out[name] = k / n if n else math.nan
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = wilson_interval(k, n, alpha)
    return out
