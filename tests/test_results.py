"""Every committed report reproduces its numbers from what it stored: the per-question scores and labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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
    if report.meta.get("eval_config", {}).get("text_behaviour") == "thresholded":  # the answer iff at the threshold
        threshold = report.meta["calibrated"]["threshold"]
        threshold = math.inf if threshold is None else threshold
        doubter = report.scores["doubter"]
        assert doubter["action"] == ["answered" if c >= threshold else "declined" for c in doubter["confidence"]]
        assert doubter["written_correct"] == [a == "answered" and bool(c)
                                              for a, c in zip(doubter["action"], report.correct)]


ABLATIONS = sorted(RESULTS.rglob("encoder_head.json"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_ablation_recomputes_from_its_stored_confidences(path):
    from peft_doubter.evaluation.metrics import auroc

    ablation = json.loads(path.read_text())
    correct = np.asarray(ablation["test_correct"], dtype=bool)
    assert ablation["variants"] and len(correct) == ablation["n_test"]
    for name, variant in ablation["variants"].items():
        assert len(variant["confidence"]) == len(correct), name
        assert auroc(correct, variant["confidence"]) == pytest.approx(variant["test_auroc"], abs=1e-12), name


CROSSFITS = sorted(RESULTS.rglob("crossfit_head.json"))


@pytest.mark.parametrize("path", CROSSFITS, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_crossfit_recomputes_from_its_stored_confidences(path):
    from peft_doubter.evaluation.metrics import auroc

    crossfit = json.loads(path.read_text())
    correct, fold = np.asarray(crossfit["correct"], dtype=bool), np.asarray(crossfit["fold"])
    assert len(correct) == len(fold) == crossfit["n"] and set(fold) == set(range(crossfit["folds"]))
    head = np.asarray(crossfit["methods"]["doubter_head"]["confidence"])
    for name, method in crossfit["methods"].items():
        confidence = np.asarray(method["confidence"])
        assert len(confidence) == len(correct) and np.isfinite(confidence).all(), name
        assert auroc(correct, confidence) == pytest.approx(method["auroc"], abs=1e-12), name
        assert [auroc(correct[fold == k], confidence[fold == k]) for k in range(crossfit["folds"])] == pytest.approx(
            method["fold_auroc"], abs=1e-12), name
        assert np.mean(method["fold_auroc"]) == pytest.approx(method["fold_mean_auroc"], abs=1e-12), name
        if "head_minus_method" in method:
            assert auroc(correct, head) - auroc(correct, confidence) == pytest.approx(
                method["head_minus_method"]["diff"], abs=1e-12), name
            assert "head_minus_method_fold_mean" in method, name
            for key, compared in (("head_minus_method_fold_mean", "doubter_head"),
                                  ("ensemble_minus_method_fold_mean", "doubter_head_ensemble")):
                if key in method:
                    ours = np.asarray(crossfit["methods"][compared]["confidence"])
                    fold_diffs = [auroc(correct[fold == k], ours[fold == k])
                                  - auroc(correct[fold == k], confidence[fold == k]) for k in range(crossfit["folds"])]
                    assert np.mean(fold_diffs) == pytest.approx(method[key]["diff"], abs=1e-12), (name, key)


LEAVE_ONE_OUT = sorted(RESULTS.rglob("leave_one_dataset_out.json"))


@pytest.mark.parametrize("path", LEAVE_ONE_OUT, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_leave_one_dataset_out_recomputes_from_its_stored_confidences(path):
    from peft_doubter.evaluation.metrics import auroc

    results = json.loads(path.read_text())
    assert len(results["held_out"]) >= 3
    for name, held in results["held_out"].items():
        correct = np.asarray(held["correct"], dtype=bool)
        assert len(correct) == held["n"] and name not in held["trained_on"]
        for method, row in held["methods"].items():
            assert len(row["confidence"]) == len(correct), (name, method)
            assert auroc(correct, row["confidence"]) == pytest.approx(row["auroc"], abs=1e-12), (name, method)


PARITIES = sorted(RESULTS.rglob("llama_cpp_parity*.json"))


@pytest.mark.parametrize("path", PARITIES, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_llama_cpp_parity_recomputes_from_its_stored_confidences(path):
    parity = json.loads(path.read_text())
    rows = parity["questions_scored"]
    assert len(rows) == parity["questions"]
    torch_conf = np.array([row["pytorch_confidence"] for row in rows])
    llama_conf = np.array([row["llama_cpp_confidence"] for row in rows])
    difference = np.abs(torch_conf - llama_conf)
    assert float(np.median(difference)) == pytest.approx(parity["confidence_abs_diff"]["median"], abs=1e-12)
    assert float(difference.max()) == pytest.approx(parity["confidence_abs_diff"]["max"], abs=1e-12)
    for entry in parity["decision_agreement_at_deciles"]:
        agree = int(((torch_conf >= entry["threshold"]) == (llama_conf >= entry["threshold"])).sum())
        assert agree == entry["agree"]
    same = sum(row["llama_cpp_draft"] == row["pytorch_draft"].strip() for row in rows)
    assert same / len(rows) == pytest.approx(parity["same_draft"], abs=1e-12)


AGENT_REPORTS = sorted(RESULTS.rglob("agent_report.json"))


@pytest.mark.parametrize("path", AGENT_REPORTS, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_agent_report_recomputes_from_its_per_question_record(path):
    from peft_doubter.agent.comparison import frontier

    report = json.loads(path.read_text())
    stored = report["per_question"]
    assert len(stored["id"]) == report["n"]
    for name, summary in report["policies"].items():
        right, actions = np.array(stored["right"][name]), np.array(stored["actions"][name])
        assert right.mean() == pytest.approx(summary["pass_rate"], abs=1e-12), name
        assert (actions != "decline").mean() == pytest.approx(summary["coverage"], abs=1e-12), name
        assert np.mean(stored["lookups"][name]) == pytest.approx(summary["lookups_per_question"], abs=1e-12), name
    closed, opened = np.array(stored["closed_correct"]), np.array(stored["open_correct"])
    for scorer, reported in report["frontiers"].items():
        again = frontier(closed, opened, np.array(stored["confidence"][f"closed_{scorer}"]))
        assert again["area"] == pytest.approx(reported["area"], abs=1e-12), scorer
