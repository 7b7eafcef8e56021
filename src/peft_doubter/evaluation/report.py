"""Side-by-side evaluation report of the Doubter and its baselines on the same held-out questions."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .metrics import _point_metrics, risk_coverage_curve, summarize, text_behaviour
from .risk_control import RealizedRisk, RiskControlResult


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None recursively, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


@dataclass
class EvaluationReport:
    """Per-method summaries on one shared set of test questions (JSON-serializable).

    ``correct`` is the pass-1 oracle of those questions; :meth:`add_method` refuses a method scored on others.
    ``scores`` keeps, per method, the per-question numbers it was ranked by (full float precision), where they
    differ its confidence in [0, 1], and for text behaviour each question's action and the judgements of the text
    written: every reported metric can be recomputed from the report alone.
    """

    title: str = "Selective prediction"
    correct: list[int] = field(default_factory=list)
    methods: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> metrics.summarize()
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # name -> {"coverage", "risk"}
    text_behaviour: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> metrics.text_behaviour()
    risk_control: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {"scores", ["confidence"], ["action", ...]}
    meta: dict[str, Any] = field(default_factory=dict)

    def add_method(
        self,
        name: str,
        correct: ArrayLike,
        confidence: ArrayLike,
        action: ArrayLike | None = None,
        written_correct: ArrayLike | None = None,
        answered_same: ArrayLike | None = None,
        coverages: Sequence[float] = (0.2, 0.5, 0.8),
        n_resamples: int = 1000,
        seed: int = 0,
        scores: ArrayLike | None = None,
    ) -> dict[str, float]:
        """Summarize one method (and its text behaviour when ``action`` is given); returns the summary. ``scores``
        rank the questions when given (e.g. the log-odds of ``confidence``); both are stored in the report."""
        corr = [int(c) for c in np.asarray(correct).astype(bool)]
        if not self.correct:
            self.correct = corr
        elif corr != self.correct:
            raise ValueError(f"Method {name!r} was scored on different questions: every method must share `correct`.")
        self.methods[name] = summarize(corr, confidence, coverages=coverages, n_resamples=n_resamples, seed=seed,
                                       scores=scores)
        ranked = confidence if scores is None else scores
        cov, risk = risk_coverage_curve(corr, ranked)
        self.curves[name] = {"coverage": cov.tolist(), "risk": risk.tolist()}
        self.scores[name] = {"scores": [float(x) for x in np.asarray(ranked, dtype=np.float64)]}
        if scores is not None:
            self.scores[name]["confidence"] = [float(x) for x in np.asarray(confidence, dtype=np.float64)]
        if action is not None:
            self.text_behaviour[name] = text_behaviour(action, corr, written_correct, answered_same)
            self.scores[name]["action"] = [str(a) for a in np.asarray(action, dtype=str)]
            for key, values in (("written_correct", written_correct), ("answered_same", answered_same)):
                if values is not None:
                    self.scores[name][key] = [int(v) for v in np.asarray(values).astype(bool)]
        return self.methods[name]

    def recomputed(self, name: str, coverages: Sequence[float] = (0.2, 0.5, 0.8)) -> dict[str, float]:
        """Method `name`'s point metrics recomputed from the per-question scores stored in the report."""
        stored = self.scores[name]
        confidence = stored.get("confidence", stored["scores"])
        return _point_metrics(np.asarray(self.correct, dtype=bool), np.asarray(confidence, dtype=np.float64),
                              coverages, 15, np.asarray(stored["scores"], dtype=np.float64))

    def recomputed_text_behaviour(self, name: str) -> dict[str, float]:
        """Method `name`'s text behaviour recomputed from the per-question actions and judgements it stored."""
        stored = self.scores[name]
        return text_behaviour(stored["action"], self.correct, stored.get("written_correct"),
                              stored.get("answered_same"))

    def add_risk_control(self, name: str, result: RiskControlResult, test: RealizedRisk) -> None:
        """Record a calibrated threshold and what it realised on the test split."""
        self.risk_control.append({"name": name, **result.to_dict(), "test": test.to_dict()})

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        return cls(**data)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EvaluationReport:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_markdown(self) -> str:
        """Tables: ranking/calibration per method, the Doubter's text behaviour, risk control."""
        lines = [f"# {self.title}", ""]
        if self.correct:
            n, k = len(self.correct), sum(self.correct)
            lines += [
                (f"{n} held-out questions, base pass-1 accuracy {_fmt(k / n)}. Brackets: 95% percentile-bootstrap "
                 "intervals over questions (Wilson intervals for the text-behaviour proportions)."),
                "",
            ]
        if self.methods:
            lines += _ranking_table(self.methods)
        if self.text_behaviour:
            lines += _text_table(self.text_behaviour, self.meta.get("eval_config", {}).get("text_behaviour"))
        if self.risk_control:
            lines += _risk_control_table(self.risk_control)
        if self.meta.get("paired_auroc_vs_baselines"):
            lines += _paired_table(self.meta["paired_auroc_vs_baselines"])
        return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _with_ci(row: Mapping[str, float | None], key: str) -> str:
    return f"{_fmt(row.get(key))} [{_fmt(row.get(f'{key}_ci_low'))}, {_fmt(row.get(f'{key}_ci_high'))}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def _ranking_table(methods: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    first = next(iter(methods.values()))
    sel_keys = sorted(
        (k for k in first if k.startswith("sel_acc@") and "_ci_" not in k), key=lambda k: float(k.split("@")[1])
    )
    header = ["Method", "AUROC [CI]", "AURC", "E-AURC", "PRR"]
    header += [f"Sel. acc@{k.split('@')[1]}% [CI]" for k in sel_keys] + ["ECE", "Brier"]
    rows = [
        [name, _with_ci(m, "auroc"), _fmt(m.get("aurc")), _fmt(m.get("eaurc")), _fmt(m.get("prr"))]
        + [_with_ci(m, k) for k in sel_keys]
        + [_fmt(m.get("ece")), _fmt(m.get("brier"))]
        for name, m in methods.items()
    ]
    notes = [("Ranked by each method's scores (the Doubter's: log-odds). PRR over the full rejection curve (0-100% "
              "rejected; LM-Polygraph papers often cap it at 50%). Selective accuracy at c% coverage: accuracy of the "
              "c% most confident questions. ECE: 15 equal-width bins. Baselines that are not probabilities (margin, "
              "entropy) are mapped into [0, 1] by a monotone transform: their ECE and Brier describe that transform."),
             ""]
    return ["## Ranking and calibration", "", *_table(header, rows), *notes]


WRITTEN_BY = {
    "thresholded": ("What the thresholded Doubter wrote (as `ask --threshold calibrated` and the server write): the "
                    "base's own pass-1 answer where the confidence reaches the calibrated threshold, judged on its "
                    "text when it was collected, else the refusal."),
    "two-pass": ("What greedy two-pass generation wrote, each answer judged on its own text (never by the pass-1 "
                 "oracle)."),
}


def _text_table(behaviour: Mapping[str, Mapping[str, float | None]], mode: str | None) -> list[str]:
    header = [
        "Method", "Coverage", "Refusal rate", "Refusal precision [CI]", "Random level", "Over-refusal",
        "Right answers declined", "Answered differently (right)", "Sel. acc. of answered [CI]", "Written accuracy",
        "Rescued / lost", "McNemar p",
    ]
    rows = [
        [
            name, _fmt(b.get("coverage")), _fmt(b.get("refusal_rate")), _with_ci(b, "refusal_precision"),
            _fmt(b.get("refusal_precision_random")), _fmt(b.get("over_refusal")), _fmt(b.get("right_declined_rate")),
            f"{b.get('answered_differently', 0)} ({b.get('answered_differently_right', 0)})",
            _with_ci(b, "selective_accuracy"), _fmt(b.get("written_accuracy")),
            f"{b.get('rescued', 0)} / {b.get('lost', 0)}", _fmt(b.get("mcnemar_pvalue")),
        ]
        for name, b in behaviour.items()
    ]
    notes = [
        (WRITTEN_BY[mode or "two-pass"] + " Coverage: share not declined. Refusal precision: declines of questions "
         "the base got wrong / declines; random level: 1 - base accuracy. Over-refusal: declines of questions the "
         "base got right / declines (= 1 - refusal precision). Right answers declined: declines of questions the base got right / questions "
         "the base got right. Answered differently: written answers other than the base's pass-1 answer (how many "
         "of them are right). Sel. acc. of answered: right written answers / written answers. Written accuracy: "
         "right written answers / all questions (a decline is not right), against the base accuracy with "
         "McNemar's test; rescued: base wrong, written right; lost: base right, declined or written wrong."),
        "",
    ]
    return ["## Text behaviour", "", *_table(header, rows), *notes]


def _risk_control_table(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    header = [
        "Method", "Procedure", "Controls", "Target", "δ", "Threshold", "Cal. coverage", "Test coverage",
        "Realised risk", "Within target",
    ]
    rows = []
    for e in entries:
        realised = e["test"]["selective_risk" if e["controlled_risk"] == "selective" else "joint_risk"]
        if realised is None or not math.isfinite(realised):
            within = "–"
        else:
            within = "yes" if realised <= e["target_risk"] else "no"
        threshold = "abstain all" if e["abstain_all"] else _fmt(e["threshold"], 4)
        rows.append([
            e["name"], e["method"].upper(), f"{e['controlled_risk']} risk", _fmt(e["target_risk"]), _fmt(e["delta"]),
            threshold, _fmt(e["calibration_coverage"]), _fmt(e["test"]["coverage"]), _fmt(realised), within,
        ])
    notes = [
        ("Selective risk: wrong / answered (LTT: holds with probability >= 1 - δ over calibration draws). "
         "Joint risk: wrong answers / all questions (CRC: holds in expectation)."),
        "",
    ]
    return ["## Risk control: target vs realised risk", "", *_table(header, rows), *notes]


def _paired_table(diffs: Mapping[str, Mapping[str, float]]) -> list[str]:
    rows = [[name, f"{d['diff']:+.3f}", f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", _fmt(d["pvalue"])]
            for name, d in diffs.items()]
    return ["## Doubter minus baseline (AUROC, paired bootstrap over the same questions)", "",
            *_table(["Baseline", "Difference", "95% CI", "p"], rows)]


def plot_risk_coverage(
    report_or_curves: EvaluationReport | Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | os.PathLike[str],
    correct: ArrayLike | None = None,
) -> None:
    """Risk–coverage curves of every method with the random level and the oracle curve, saved to ``path``.

    Takes a report (curves, oracle and risk-control entries come from it) or ``{name: (coverages, risks)}`` with
    ``correct`` for the random and oracle references. A report with risk-control entries adds a second panel,
    target vs realised risk on the test split.
    """
    from matplotlib.figure import Figure  # optional `eval` dependency; no pyplot, so no global backend change

    if isinstance(report_or_curves, EvaluationReport):
        curves = {k: (v["coverage"], v["risk"]) for k, v in report_or_curves.curves.items()}
        correct = report_or_curves.correct
        entries = report_or_curves.risk_control
    else:
        curves, entries = dict(report_or_curves), []
    fig = Figure(figsize=(11, 4.5) if entries else (6, 4.5))
    ax = fig.add_subplot(1, 2 if entries else 1, 1)
    for name, (cov, risk) in curves.items():
        ax.plot(cov, risk, drawstyle="steps-post", label=name)
    if correct is not None and len(correct):
        corr = np.asarray(correct).astype(bool)
        n, n_right = corr.size, int(corr.sum())
        k = np.arange(1, n + 1)
        ax.axhline(1.0 - n_right / n, color="grey", linestyle="--", label="random level (base error rate)")
        ax.plot(k / n, np.maximum(0, k - n_right) / k, color="black", linestyle=":", label="oracle ranking")
    ax.set(xlabel="coverage", ylabel="selective risk (error rate of answered)", xlim=(0, 1), ylim=(0, None))
    ax.set_title("Risk–coverage")
    ax.legend(fontsize="small")
    if entries:
        rc = fig.add_subplot(1, 2, 2)
        points: dict[str, list[tuple[float, float]]] = {}
        for e in entries:
            realised = e["test"]["selective_risk" if e["controlled_risk"] == "selective" else "joint_risk"]
            if realised is not None and math.isfinite(realised):
                label = f"{e['name']} ({e['method']}, {e['controlled_risk']})"
                points.setdefault(label, []).append((e["target_risk"], realised))
        for label, xy in points.items():
            rc.scatter(*zip(*xy), label=label)
        top = max([e["target_risk"] for e in entries] + [0.05]) * 1.2
        rc.plot([0, top], [0, top], color="black", linestyle=":", label="realised = target")
        rc.set(xlabel="target risk", ylabel="realised test risk", xlim=(0, top), ylim=(0, None))
        rc.set_title("Risk control: target vs realised")
        rc.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
