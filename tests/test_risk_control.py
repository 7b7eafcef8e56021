"""Decline thresholds with finite-sample guarantees (LTT for selective risk, CRC for joint risk)."""

import math

import numpy as np
import pytest

from peft_doubter.evaluation.risk_control import calibrate, realized


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Informative confidence: P(correct | c) = c with c ~ U(0, 1), so the selective risk at t is (1 - t) / 2."""
    conf = rng.random(n)
    return conf, rng.random(n) < conf


def test_ltt_exact_binomial_boundary():
    # alpha = delta = 0.1. With 0 errors among m answered the p-value is 0.9^m: 0.9^21 = 0.109 > 0.1 and
    # 0.9^22 = 0.098 <= 0.1, so 22 right answers on top are the fewest that certify anything. The next threshold
    # (23 answered, 1 error) has p = 0.9^23 + 23 * 0.1 * 0.9^22 = 0.315 and stops the fixed sequence.
    conf = np.linspace(1.0, 0.0, 100)
    correct = np.r_[np.ones(22), np.zeros(78)]
    result = calibrate(0.1, conf, correct, delta=0.1)
    assert not result.abstain_all
    assert result.threshold == conf[21]
    assert (result.calibration_coverage, result.calibration_risk) == (0.22, 0.0)
    assert result.controlled_risk == "selective" and result.method == "ltt"

    assert calibrate(0.1, conf, np.r_[np.ones(21), np.zeros(79)], delta=0.1).abstain_all


def test_ltt_start_coverage_skips_the_fragile_top():
    # 1000 questions: the most confident one is wrong, the next 300 right, the rest wrong. Walking from the top
    # (start_coverage=0), the first testable threshold (22 answered, 1 error, p = 0.33) stops everything; starting
    # at 5% coverage (50 answered, 1 error, p = 0.034) the walk goes on past the 301 most confident.
    conf = np.linspace(1.0, 0.0, 1000)
    correct = np.r_[0, np.ones(300), np.zeros(699)]
    assert calibrate(0.1, conf, correct, delta=0.1, start_coverage=0.0).abstain_all
    result = calibrate(0.1, conf, correct, delta=0.1)
    assert not result.abstain_all and result.calibration_coverage > 0.3 and result.calibration_risk <= 0.1


def test_ltt_guarantee_over_repetitions():
    target, delta, reps = 0.2, 0.1, 200
    within, coverages = [], []
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        result = calibrate(target, *_draw(rng, 500), delta=delta)
        test = realized(result.threshold, *_draw(rng, 100_000))
        within.append(test.n_answered == 0 or test.selective_risk <= target)  # abstaining on all makes no error
        coverages.append(test.coverage)
    # P(risk <= target) >= 1 - delta; slack 0.05 for 200 repetitions and the finite test split. (Picking the
    # largest coverage whose calibration risk is <= target instead, the plug-in rule, meets it in about half.)
    assert np.mean(within) >= 1 - delta - 0.05
    # Not trivially safe: it answers a real share (the ideal threshold t = 0.6 covers 40%).
    assert np.mean(coverages) > 0.15


def test_ltt_unreachable_target_abstains_on_everything():
    rng = np.random.default_rng(0)
    conf = rng.random(1000)
    correct = rng.random(1000) < 0.5  # confidence says nothing; half the answers are wrong
    result = calibrate(0.05, conf, correct, delta=0.1)
    assert result.abstain_all and result.threshold == math.inf
    assert result.calibration_coverage == 0.0 and "abstaining on every question" in result.message
    test = realized(result.threshold, conf, correct)
    assert test.coverage == 0.0 and test.n_answered == 0 and math.isnan(test.selective_risk)


def test_crc_hand_values():
    # Cumulative errors at thresholds .9 .8 .7 .6 .5: 0 0 1 1 2; n = 5.
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    correct = [1, 1, 0, 1, 0]
    # target .4: (e + 1) / 6 <= .4 iff e <= 1.4 -> lowest valid threshold .6, answering 4 with 1 error.
    result = calibrate(0.4, conf, correct, method="crc")
    assert (result.threshold, result.calibration_coverage, result.calibration_risk) == (0.6, 0.8, 0.25)
    assert result.controlled_risk == "joint" and result.delta is None
    # target .15: even answering nothing gives (0 + 1) / 6 > .15.
    assert calibrate(0.15, conf, correct, method="crc").abstain_all


def test_crc_bounds_expected_joint_risk():
    target = 0.1
    joint, coverages = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        result = calibrate(target, *_draw(rng, 200), method="crc")
        test = realized(result.threshold, *_draw(rng, 20_000))
        joint.append(test.joint_risk)
        coverages.append(test.coverage)
    assert np.mean(joint) <= target + 0.005
    assert np.mean(joint) > 0.07  # uses most of the budget
    assert np.mean(coverages) > 0.3


def test_realized_hand_values():
    out = realized(0.7, [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0])
    assert (out.coverage, out.n_answered, out.n) == (0.6, 3, 5)
    assert out.selective_risk == pytest.approx(1 / 3)
    assert out.joint_risk == pytest.approx(1 / 5)


def test_validation():
    with pytest.raises(ValueError, match="method"):
        calibrate(0.1, [0.5], [1], method="plugin")
    with pytest.raises(ValueError, match="target_risk"):
        calibrate(0.0, [0.5], [1])
    with pytest.raises(ValueError, match="same length"):
        calibrate(0.1, [0.5, 0.4], [1])
