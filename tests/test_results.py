"""Every committed report reproduces its numbers from what it stored: the per-question scores and labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peft_doubter.evaluation.report import EvaluationReport


RESULTS = Path(__file__).resolve().parents[1] / "results"
REPORTS = sorted(path for path in RESULTS.rglob("report*.json"))


def test_results_hold_reports():
    assert REPORTS, f"no report*.json under {RESULTS}"


@pytest.mark.parametrize("path", REPORTS, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_report_recomputes_from_its_stored_scores(path):
    report = EvaluationReport.from_json(path)
    assert set(report.scores) == set(report.methods), "every ranked method stores what it ranked"
    for name, reported in report.methods.items():
        assert len(report.scores[name]["scores"]) == len(report.correct) == report.meta["n"], name
        again = report.recomputed(name)
        for key in ("auroc", "aurc", "sel_acc@20", "sel_acc@50", "sel_acc@80", "ece", "brier"):
            if key in reported:
                assert again[key] == pytest.approx(reported[key], abs=1e-9, nan_ok=True), (name, key)
    for name, reported in report.text_behaviour.items():
        again = report.recomputed_text_behaviour(name)
        assert set(again) == set(reported), name
        for key, value in reported.items():  # JSON writes an undefined proportion (no corrections: 0/0) as null
            expected = math.nan if value is None else value
            assert again[key] == pytest.approx(expected, abs=1e-9, nan_ok=True), (name, key)
