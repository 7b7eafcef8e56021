"""Evaluation report: JSON round trip, Markdown tables, risk-coverage plot."""

import json

import numpy as np
import pytest

from peft_doubter.evaluation.report import EvaluationReport, plot_risk_coverage
from peft_doubter.evaluation.risk_control import calibrate, realized


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> EvaluationReport:
    rng = np.random.default_rng(0)
    n = 200
    correct = rng.random(n) < 0.6
    doubter = np.clip(0.5 + 0.3 * (correct - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    action = np.where(doubter < 0.35, "declined", "answered").astype(object)
    action[:5] = "corrected"
    rep = EvaluationReport(title="TriviaQA test", meta={"model": "tiny"})
    rep.add_method("doubter", correct, doubter, action=action, written_correct=rng.random(n) < 0.5, n_resamples=100)
    rep.add_method("random", correct, rng.random(n), n_resamples=100)
    rep.add_method("msp", correct, np.clip(correct * 0.2 + rng.random(n) * 0.8, 0, 1), n_resamples=100)
    result = calibrate(0.3, doubter[:100], correct[:100], delta=0.2)
    rep.add_risk_control("doubter", result, realized(result.threshold, doubter[100:], correct[100:]))
    unreachable = calibrate(0.01, doubter[:100], correct[:100])
    rep.add_risk_control("doubter", unreachable, realized(unreachable.threshold, doubter[100:], correct[100:]))
    return rep


def test_markdown_has_every_method_and_section(report):
    md = report.to_markdown()
    for name in ("doubter", "random", "msp"):
        assert f"| {name} | " in md
    assert "## Ranking and calibration" in md and "AUROC [CI]" in md and "Sel. acc@80% [CI]" in md
    auroc = report.methods["msp"]
    assert f"{auroc['auroc']:.3f} [{auroc['auroc_ci_low']:.3f}, {auroc['auroc_ci_high']:.3f}]" in md
    # Text behaviour appears only for the method that has text: one header row + one data row.
    text = md.split("## Text behaviour")[1].split("##")[0]
    assert "| doubter | " in text and "| random | " not in text
    tb = report.text_behaviour["doubter"]
    assert f"{tb['refusal_precision_random']:.3f}" in text
    risk = md.split("## Risk control")[1]
    assert "| LTT |" in risk and "abstain all" in risk and "selective risk" in risk


def test_json_round_trip_is_standard_json(report, tmp_path):
    path = tmp_path / "report.json"
    report.to_json(path)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert set(data["methods"]) == {"doubter", "random", "msp"}
    back = EvaluationReport.from_json(path)
    assert back.methods["msp"] == report.methods["msp"]
    assert back.risk_control[1]["threshold"] is None  # inf is stored as null
    assert back.to_markdown() == report.to_markdown()


def test_text_behaviour_recomputes_from_stored_actions_and_judgements(report, tmp_path):
    report.to_json(tmp_path / "report.json")
    back = EvaluationReport.from_json(tmp_path / "report.json")
    stored = back.scores["doubter"]
    assert len(stored["action"]) == len(stored["written_correct"]) == len(back.correct)
    assert back.recomputed_text_behaviour("doubter") == pytest.approx(report.text_behaviour["doubter"], nan_ok=True)
    # Judging the answered text by the pass-1 oracle instead changes the reported number.
    stored.pop("written_correct")
    stored["action"] = ["answered" if a == "corrected" else a for a in stored["action"]]
    oracle = back.recomputed_text_behaviour("doubter")
    assert oracle["selective_accuracy"] != pytest.approx(report.text_behaviour["doubter"]["selective_accuracy"])
    assert "action" not in back.scores["random"]


def test_methods_must_share_questions(report):
    with pytest.raises(ValueError, match="different questions"):
        report.add_method("other", np.zeros(200), np.zeros(200))


def test_plot_from_report_and_from_curves(report, tmp_path):
    path = tmp_path / "rc.png"
    plot_risk_coverage(report, path)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    curves = {"a": ([0.5, 1.0], [0.1, 0.4]), "b": ([0.25, 1.0], [0.3, 0.4])}
    other = tmp_path / "curves.png"
    plot_risk_coverage(curves, other, correct=[1, 1, 0, 1, 0])
    assert other.read_bytes()[:8] == PNG_MAGIC
