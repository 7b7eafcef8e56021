"""Selective-prediction metrics against values computed by hand on tiny inputs."""

import math

import numpy as np
import pytest

from peft_doubter.evaluation import metrics as M
from peft_doubter.evaluation import statistics as S


# The running example. Sorted by confidence (already descending): correct 1 0 1 1 0.
#   top-k errors, k = 1..5:  0 1 1 1 2   -> risks 0, 1/2, 1/3, 1/4, 2/5
#   AURC   = (0 + 1/2 + 1/3 + 1/4 + 2/5) / 5 = (89/60) / 5 = 89/300
#   oracle (3 right first): risks 0, 0, 0, 1/4, 2/5 -> AURC_oracle = (13/20) / 5 = 39/300
#   E-AURC = 50/300 = 1/6
#   AUROC: right {.9, .7, .6} vs wrong {.8, .5}: .9 beats both, .7 and .6 beat only .5 -> 4/6
#   PRR = (error rate - AURC) / (error rate - AURC_oracle) = (120 - 89) / (120 - 39) = 31/81
#   ECE, 2 bins [0, .5) [.5, 1]: all in bin 2, accuracy 3/5, mean confidence .7 -> |.6 - .7| = .1
#   Brier = (.1^2 + .8^2 + .3^2 + .4^2 + .5^2) / 5 = 1.15 / 5 = .23
#   selective accuracy at 40% coverage: top 2 = (right, wrong) -> 1/2; at 60%: top 3 -> 2/3
CORRECT = [1, 0, 1, 1, 0]
CONF = [0.9, 0.8, 0.7, 0.6, 0.5]


def test_risk_coverage_curve_hand_values():
    cov, risk = M.risk_coverage_curve(CORRECT, CONF)
    np.testing.assert_allclose(cov, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])


def test_scalar_metrics_hand_values():
    assert M.aurc(CORRECT, CONF) == pytest.approx(89 / 300)
    assert M.eaurc(CORRECT, CONF) == pytest.approx(1 / 6)
    assert M.auroc(CORRECT, CONF) == pytest.approx(4 / 6)
    assert M.prr(CORRECT, CONF) == pytest.approx(31 / 81)
    assert M.ece(CORRECT, CONF, n_bins=2) == pytest.approx(0.1)
    assert M.brier(CORRECT, CONF) == pytest.approx(0.23)
    assert M.selective_accuracy_at_coverage(CORRECT, CONF, 0.4) == pytest.approx(0.5)
    assert M.selective_accuracy_at_coverage(CORRECT, CONF, 0.6) == pytest.approx(2 / 3)


def test_ece_two_populated_bins():
    # bin [0, .5): conf .2, .4 (mean .3), accuracy 1/2 -> 1/2 * .2
    # bin [.5, 1]: conf .6, .8 (mean .7), accuracy 1 -> 1/2 * .3
    assert M.ece([0, 1, 1, 1], [0.2, 0.4, 0.6, 0.8], n_bins=2) == pytest.approx(0.25)


def test_threshold_metrics():
    assert M.coverage(CONF, 0.7) == pytest.approx(0.6)
    assert M.selective_accuracy(CORRECT, CONF, 0.7) == pytest.approx(2 / 3)
    assert M.selective_risk(CORRECT, CONF, 0.7) == pytest.approx(1 / 3)
    assert math.isnan(M.selective_accuracy(CORRECT, CONF, 0.95))


def test_oracle_and_reversed_rankings():
    assert M.eaurc(CORRECT, CORRECT) == pytest.approx(0.0)
    assert M.prr(CORRECT, CORRECT) == pytest.approx(1.0)
    assert M.auroc(CORRECT, CORRECT) == 1.0
    assert M.auroc(CORRECT, 1 - np.array(CORRECT)) == 0.0


def test_ties_are_grouped_and_order_invariant():
    # Two tie groups, each one right + one wrong.
    cov, risk = M.risk_coverage_curve([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.3])
    np.testing.assert_allclose(cov, [0.5, 1.0])
    np.testing.assert_allclose(risk, [0.5, 0.5])
    assert M.auroc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.3]) == pytest.approx(0.5)
    # Expected errors in the top k spread a tie group's errors uniformly: risk 1/2 at every k.
    assert M.aurc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.3]) == pytest.approx(0.5)
    assert M.aurc([0, 1, 0, 1], [0.8, 0.8, 0.3, 0.3]) == pytest.approx(0.5)
    # Right {.6, .4} vs wrong {.6, .2}: .5 + 1 + 0 + 1 = 2.5 of 4 pairs.
    assert M.auroc([1, 1, 0, 0], [0.6, 0.4, 0.6, 0.2]) == pytest.approx(0.625)
    # A tie at the coverage cut: top 2 = the .9 (right) + one of three .5s (one right) -> (1 + 1/3) / 2.
    assert M.selective_accuracy_at_coverage([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.5], 0.5) == pytest.approx(2 / 3)
    assert M.selective_accuracy_at_coverage([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5], 0.5) == pytest.approx(2 / 3)


def test_auroc_matches_sklearn_on_random_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    correct = rng.random(300) < 0.6
    conf = rng.integers(0, 7, 300) / 6.0
    assert M.auroc(correct, conf) == pytest.approx(roc_auc_score(correct, conf))


def test_undefined_cases():
    assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(M.prr([0, 0], [0.1, 0.5]))
    with pytest.raises(ValueError, match="confidence"):
        M.brier([1, 0], [0.5, 1.5])
    with pytest.raises(ValueError, match="correct"):
        M.aurc([1, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="coverage"):
        M.selective_accuracy_at_coverage(CORRECT, CONF, 0.0)


def test_wilson_known_value():
    low, high = S.wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert all(math.isnan(x) for x in S.wilson_interval(0, 0))


def test_mcnemar_exact_and_chi_square():
    # Discordant: A-only right = 1, B-only right = 5 -> exact two-sided p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64.
    a = [1, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 0]
    stat, p = S.mcnemar(a, b)
    assert (stat, p) == (1.0, pytest.approx(14 / 64))
    assert S.mcnemar(b, a).pvalue == pytest.approx(14 / 64)
    # 30 vs 10 discordant: (|30 - 10| - 1)^2 / 40 = 9.025; chi-square(1) survival = erfc(sqrt(9.025 / 2)) = 0.0026631.
    a = np.r_[np.ones(30), np.zeros(10), np.ones(5)]
    b = np.r_[np.zeros(30), np.ones(10), np.ones(5)]
    stat, p = S.mcnemar(a, b)
    assert stat == pytest.approx(9.025)
    assert p == pytest.approx(0.0026631, abs=1e-7)
    assert S.mcnemar([1, 0], [1, 0]) == (0.0, 1.0)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    conf = rng.random(200)
    correct = rng.random(200) < conf
    point = M.auroc(correct, conf)
    low, high = S.bootstrap_ci(M.auroc, correct, conf, n_resamples=300, seed=1)
    assert low < point < high
    assert S.bootstrap_ci(M.auroc, correct, conf, n_resamples=300, seed=1) == (low, high)
    assert S.bootstrap_ci(M.auroc, correct, conf, n_resamples=300, seed=2) != (low, high)


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(0)
    conf = rng.random(300)
    correct = rng.random(300) < conf
    noise = rng.random(300)
    out = S.paired_bootstrap_diff(M.auroc, correct, conf, noise, n_resamples=300)
    assert out["diff"] == pytest.approx(M.auroc(correct, conf) - M.auroc(correct, noise))
    assert 0 < out["ci_low"] < out["diff"] < out["ci_high"]
    assert out["pvalue"] < 0.01
    same = S.paired_bootstrap_diff(M.auroc, correct, conf, conf, n_resamples=50)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)


def test_stratified_paired_bootstrap_diff_compares_within_strata():
    """Scores on another scale in each stratum (as from the models of a cross-fitting): pooling them ruins the
    ranking, the stratified difference is the mean of the per-stratum differences, resampled within strata."""
    rng = np.random.default_rng(0)
    strata = np.repeat([0, 1, 2], 200)
    conf = rng.random(600)
    correct = rng.random(600) < conf
    shifted = conf + 5 * strata  # same order within each stratum, another scale per stratum
    noise = rng.random(600)
    out = S.stratified_paired_bootstrap_diff(M.auroc, correct, shifted, noise, strata, n_resamples=200)
    per_stratum = [M.auroc(correct[strata == k], conf[strata == k]) - M.auroc(correct[strata == k], noise[strata == k])
                   for k in range(3)]
    assert out["diff"] == pytest.approx(np.mean(per_stratum))
    assert 0 < out["ci_low"] < out["diff"] < out["ci_high"] and out["pvalue"] < 0.01
    assert M.auroc(correct, shifted) < M.auroc(correct, conf) - 0.05, "pooled scores of other scales rank worse"
    with pytest.raises(ValueError, match="same shape"):
        S.stratified_paired_bootstrap_diff(M.auroc, correct, conf, noise, strata[:10])


def test_summarize_points_and_intervals():
    out = M.summarize(CORRECT, CONF, n_resamples=200, seed=0)
    assert out["n"] == 5
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["auroc"] == pytest.approx(4 / 6)
    assert out["aurc"] == pytest.approx(89 / 300)
    assert out["eaurc"] == pytest.approx(1 / 6)
    assert out["prr"] == pytest.approx(31 / 81)
    assert out["brier"] == pytest.approx(0.23)
    assert out["sel_acc@20"] == 1.0 and out["sel_acc@50"] == pytest.approx(2 / 3)
    assert out["sel_acc@80"] == pytest.approx(3 / 4)
    names = ("accuracy", "auroc", "aurc", "eaurc", "prr", "ece", "brier", "sel_acc@20", "sel_acc@50", "sel_acc@80")
    for name in names:
        assert out[f"{name}_ci_low"] <= out[name] <= out[f"{name}_ci_high"], name
    assert M.summarize(CORRECT, CONF, n_resamples=200, seed=0) == out


# Text behaviour. Question:        0          1          2            3          4
ACTION = ["answered", "declined", "corrected", "declined", "answered"]
BASE = [1, 0, 0, 1, 0]
WRITTEN = [1, 0, 1, 0, 0]  # read where answered or corrected: 0 is right, 2's correction is right, 4 is wrong


def test_text_behaviour_hand_values():
    out = M.text_behaviour(ACTION, BASE, WRITTEN)
    # Declines: 1 (base wrong) and 3 (base right). The corrected wrong answer (2) is not a refusal.
    assert out["refusal_precision"] == pytest.approx(1 / 2)
    assert out["refusal_precision_random"] == pytest.approx(3 / 5)
    assert out["over_refusal"] == pytest.approx(1 / 2)
    assert out["right_declined_rate"] == pytest.approx(1 / 2)  # of right answers {0, 3}, 3 was declined
    assert out["refusal_rate"] == pytest.approx(2 / 5)
    assert out["coverage"] == pytest.approx(3 / 5)
    assert out["correction_rate"] == pytest.approx(1 / 5)
    assert out["correction_accuracy"] == 1.0
    assert out["refusal_recall"] == pytest.approx(1 / 3)
    # Wrong {1, 2, 4}: 1 declined, 2 fixed -> 2/3.
    assert out["total_recovery"] == pytest.approx(2 / 3)
    # Not declined {0, 2, 4}: 0 right, 2 corrected right, 4 wrong.
    assert out["selective_accuracy"] == pytest.approx(2 / 3)
    assert out["kept_accuracy"] == pytest.approx(1 / 2)
    assert out["refusal_precision_ci_low"] < 0.5 < out["refusal_precision_ci_high"]
    assert (out["n_declined"], out["n_corrected"], out["n_answered"]) == (2, 1, 2)
    assert (out["rescued"], out["lost"]) == (1, 1)  # 2 fixed; 3 declined though the base was right
    assert out["written_accuracy"] == pytest.approx(2 / 5)


def test_answered_text_is_judged_on_what_was_written_not_on_the_pass1_oracle():
    """Question 4: the base was wrong, the Doubter answered differently and right; question 0: the base was right,
    the Doubter answered differently and wrong. The written text decides, the oracle only says what was declined."""
    action = ["answered", "declined", "answered", "answered", "answered"]
    base = [1, 0, 0, 1, 0]
    written = [0, 0, 0, 1, 1]
    same = [0, 1, 1, 1, 0]
    out = M.text_behaviour(action, base, written, same)
    assert out["selective_accuracy"] == pytest.approx(2 / 4)  # answered {0, 2, 3, 4}: 3 and 4 right as written
    assert out["kept_accuracy"] == pytest.approx(2 / 4)
    assert (out["answered_differently"], out["answered_differently_right"]) == (2, 1)
    assert (out["rescued"], out["lost"]) == (1, 1)
    assert out["refusal_precision"] == 1.0  # the decline (question 1) is judged by the pass-1 oracle
    oracle_judged = M.text_behaviour(action, base)  # without the written verdicts: every answer repeats the base's
    assert oracle_judged["selective_accuracy"] == pytest.approx(2 / 4) and oracle_judged["rescued"] == 0


def test_text_behaviour_validation():
    with pytest.raises(ValueError, match="written_correct"):
        M.text_behaviour(ACTION, BASE)
    with pytest.raises(ValueError, match="action"):
        M.text_behaviour(["answered", "refused"], [1, 0])
    out = M.text_behaviour(["answered", "answered"], [1, 0])
    assert math.isnan(out["refusal_precision"]) and out["coverage"] == 1.0


def test_evaluate_load_offline(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    from peft_doubter.evaluation.evaluate_metric import METRIC_PATH

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    metric = evaluate.load(METRIC_PATH, keep_in_memory=True)
    out = metric.compute(predictions=CONF, references=CORRECT, n_resamples=100, seed=3)
    assert out == M.summarize(CORRECT, CONF, n_resamples=100, seed=3)
    assert out["auroc"] == pytest.approx(4 / 6)
