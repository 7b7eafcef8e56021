"""Baseline confidences from cached pass-1 features."""

import math

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from peft_doubter.evaluation.baselines import (
    LogisticProbe,
    PassOneFeatures,
    answer_feature_matrix,
    answer_probability_scores,
    answer_token_summary,
    baseline_confidences,
    random_confidence,
)
from peft_doubter.evaluation.metrics import auroc


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny logistic fits are several times slower with BLAS threads competing on a loaded 2-core machine."""
    with threadpool_limits(1):
        yield


OPEN_QA = PassOneFeatures(
    token_logprobs=[math.log(0.5), math.log(0.2), math.log(0.9)],
    first_token_top2_logprobs=(math.log(0.5), math.log(0.25)),
    first_token_entropy=1.0,
)
MULTIPLE_CHOICE = PassOneFeatures(option_logprobs=[0.0, -1.0, -2.0])


def test_open_qa_scores_hand_values():
    scores = answer_probability_scores([OPEN_QA])
    assert set(scores) == {"p_first_token", "p_min_token", "p_sequence", "p_mean_token", "logit_margin",
                           "neg_entropy"}
    assert scores["p_first_token"][0] == pytest.approx(0.5)
    assert scores["p_min_token"][0] == pytest.approx(0.2)
    assert scores["p_sequence"][0] == pytest.approx(0.5 * 0.2 * 0.9)
    assert scores["p_mean_token"][0] == pytest.approx((0.5 * 0.2 * 0.9) ** (1 / 3))
    assert scores["logit_margin"][0] == pytest.approx(1 - 0.25 / 0.5)  # 1 - p2 / p1
    assert scores["neg_entropy"][0] == pytest.approx(math.exp(-1.0))


def test_multiple_choice_option_softmax():
    scores = answer_probability_scores([MULTIPLE_CHOICE])
    assert set(scores) == {"option_msp"}
    assert scores["option_msp"][0] == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)))
    shifted = answer_probability_scores([PassOneFeatures(option_logprobs=[5.0, 4.0, 3.0])])
    assert shifted["option_msp"][0] == pytest.approx(scores["option_msp"][0])


def test_scores_only_where_every_question_has_the_feature():
    assert set(answer_probability_scores([OPEN_QA, MULTIPLE_CHOICE])) == set()
    with pytest.raises(ValueError, match="missing"):
        answer_feature_matrix([MULTIPLE_CHOICE], ["logit_margin"])
    x = answer_feature_matrix([OPEN_QA])  # sorted signal names: first, margin, mean, min, neg entropy, sequence
    total = math.log(0.5 * 0.2 * 0.9)
    np.testing.assert_allclose(x, [[math.log(0.5), math.log(2.0), total / 3, math.log(0.2), -1.0, total]])


def test_random_confidence_is_seeded():
    a = random_confidence(50, seed=3)
    assert np.array_equal(a, random_confidence(50, seed=3))
    assert not np.array_equal(a, random_confidence(50, seed=4))
    assert a.shape == (50,) and a.min() >= 0 and a.max() < 1


def _probe_data(seed: int, n: int, d: int = 8, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, rng.random(n) < 1 / (1 + np.exp(-signal * x[:, 0]))


def test_logistic_probe_learns_and_cross_validates_c():
    x_train, y_train = _probe_data(0, 300)
    x_test, y_test = _probe_data(1, 300)
    probe = LogisticProbe(seed=0).fit(x_train, y_train)
    p = probe.predict_proba(x_test)
    assert p.shape == (300,) and 0 <= p.min() and p.max() <= 1
    assert auroc(y_test, p) > 0.75
    assert probe.C_ in probe.Cs and probe.C_ > min(probe.Cs)
    # Features unrelated to correctness: cross-validation picks strong regularization.
    noise = LogisticProbe(seed=0).fit(x_train, np.random.default_rng(2).random(300) < 0.5)
    assert noise.C_ <= 1e-3 < probe.C_


def test_logistic_probe_needs_both_classes():
    with pytest.raises(ValueError, match="2 right and 2 wrong"):
        LogisticProbe().fit(np.zeros((5, 2)), [1, 1, 1, 1, 0])
    with pytest.raises(RuntimeError, match="fit"):
        LogisticProbe().predict_proba(np.zeros((1, 2)))


def _split(seed: int, n: int) -> tuple[list[PassOneFeatures], np.ndarray, np.ndarray]:
    """Correctness depends on a hidden direction and, separately, on the first-token probability."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, 6))
    p_first = rng.uniform(0.05, 0.95, n)
    logit = 2.0 * hidden[:, 0] + 4.0 * (p_first - 0.5)
    correct = rng.random(n) < 1 / (1 + np.exp(-logit))
    feats = [
        PassOneFeatures(
            token_logprobs=[math.log(p), math.log(p * 0.9)],
            first_token_top2_logprobs=(math.log(p), math.log((1 - p) / 2)),
            first_token_entropy=float(-p * math.log(p) - (1 - p) * math.log(1 - p)),
        )
        for p in p_first
    ]
    return feats, correct, hidden


def test_baseline_confidences_share_questions_and_rank_sensibly():
    train_feats, train_correct, hidden_train = _split(0, 400)
    test_feats, test_correct, hidden_test = _split(1, 400)
    out = baseline_confidences(train_feats, train_correct, test_feats, hidden_train, hidden_test, seed=0)
    assert set(out) == {
        "random", "p_first_token", "p_min_token", "p_sequence", "p_mean_token", "logit_margin", "neg_entropy",
        "probe", "probe+answer_prob",
    }
    for name, conf in out.items():
        assert conf.shape == (400,) and conf.min() >= 0 and conf.max() <= 1, name
    score = {name: auroc(test_correct, conf) for name, conf in out.items()}
    assert abs(score["random"] - 0.5) < 0.1
    assert score["probe+answer_prob"] > max(score["probe"], score["p_first_token"]) + 0.02


def test_stacked_baselines_use_the_extra_features():
    train_feats, train_correct, hidden_train = _split(0, 400)
    test_feats, test_correct, hidden_test = _split(1, 400)
    rng = np.random.default_rng(3)
    # an extra feature the probe's inputs lack, which carries part of the signal
    extra_train = (train_correct + rng.normal(0, 0.7, 400))[:, None]
    extra_test = (test_correct + rng.normal(0, 0.7, 400))[:, None]
    out = baseline_confidences(train_feats, train_correct, test_feats, hidden_train, hidden_test, seed=0,
                               extra_train=extra_train, extra_test=extra_test)
    score = {name: auroc(test_correct, conf) for name, conf in out.items()}
    assert score["stacked_lr"] > score["probe+answer_prob"] + 0.02
    assert score["stacked_gbm"] > score["probe"]


def test_answer_token_summary_shapes():
    states = [np.ones((3, 2, 4)), np.zeros((0, 2, 4))]
    signals = [np.arange(18, dtype=float).reshape(3, 6), np.zeros((0, 6))]
    summary = answer_token_summary(states, signals)
    assert summary.shape == (2, 2 * 4 + 3 * 6 + 1)
    np.testing.assert_allclose(summary[0, -1], 3) and np.testing.assert_allclose(summary[1], 0)
    np.testing.assert_allclose(summary[0, 8:14], signals[0].min(0))


def test_baseline_confidences_length_checks():
    feats, correct, hidden = _split(0, 20)
    with pytest.raises(ValueError, match="same length"):
        baseline_confidences(feats, correct[:-1], feats, hidden, hidden)
    with pytest.raises(ValueError, match="same length"):
        baseline_confidences(feats, correct, feats[:-1], hidden, hidden)
