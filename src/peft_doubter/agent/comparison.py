"""AgentComparison: every gating policy on the same questions, from one cache of drafts.

For each question the cache holds the closed-book draft and the draft with the looked-up evidence (the question as
the query, the corpus' top passages), whether each is right (the run's judge), every scorer's confidence in each,
and the seconds each took. A policy is then a function of the cache, so never-lookup, always-lookup, the oracle
gate, a random gate at a matched lookup rate, each scorer as gate, the seeds' text mode and the calibrated
two-threshold policy are compared on exactly the same answers; drafts are made one question at a time, as the live
agent makes them, so a live run reproduces the simulated actions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..data.shards import build_shards, finished_rows, load_shards
from ..evaluation.risk_control import calibrate, realized
from ..evaluation.statistics import bootstrap_ci, paired_bootstrap_diff, wilson_interval
from ..paths import write_json
from .agent import MetaAgent, Thresholds, example_for


REGIMES = ("closed", "open")


def cache_features(scorers: Sequence[str]) -> datasets.Features:
    fields = {"id": datasets.Value("string"), "question": datasets.Value("string"),
              "answers": datasets.Sequence(datasets.Value("string")), "split": datasets.Value("string"),
              "passages": datasets.Sequence(datasets.Value("string"))}
    for regime in REGIMES:
        fields[f"{regime}_answer"] = datasets.Value("string")
        fields[f"{regime}_correct"] = datasets.Value("bool")
        fields[f"{regime}_written"] = datasets.Value("string")  # what pass 2 wrote (text mode)
        fields[f"{regime}_seconds"] = datasets.Value("float64")
        for scorer in scorers:
            fields[f"{regime}_{scorer}"] = datasets.Value("float64")
    return datasets.Features(fields)


def build_cache(agent: MetaAgent, scorers: dict[str, Any], questions: Sequence[dict], judge, directory: Path,
                text_mode: bool = True, shard_size: int = 50, written_split: str = "test") -> datasets.Dataset:
    """The per-question cache (resumable shards). `agent` supplies the backend, exemplars and lookup tool;
    `scorers` every gate to score both drafts with; `questions` are cached-question rows (with gold answers). With
    `text_mode`, what pass 2 writes is recorded for the questions of `written_split` (the compared split: text mode
    has no threshold to calibrate, and writing costs more than drafting and scoring together)."""
    import time

    features = cache_features(list(scorers))
    progress = tqdm(total=len(questions), desc="Agent cache", unit="q",
                    initial=min(len(questions), finished_rows(directory, shard_size)))

    def produce(start: int, end: int) -> list[dict]:
        rows = []
        for question in questions[start:end]:
            found = agent.registry.call("lookup", {"query": question["question"]})
            out = {"id": question["id"], "question": question["question"], "answers": list(question["answers"]),
                   "split": question["split"], "passages": [p.id for p, _ in found.data or []]}
            for regime, example, exemplars in (
                    ("closed", example_for(question["question"], identifier=question["id"]), agent.exemplars),
                    ("open", example_for(question["question"], found.content, question["id"]), agent.open_exemplars)):
                begin = time.perf_counter()
                draft = agent.backend.drafts([example], exemplars)[0]
                out[f"{regime}_seconds"] = time.perf_counter() - begin + (found.seconds if regime == "open" else 0)
                out[f"{regime}_answer"] = draft["pass1_answer"]
                out[f"{regime}_correct"] = bool(draft["pass1_answer"]) and judge(
                    question["question"], draft["pass1_answer"], list(question["answers"]))
                for name, scorer in scorers.items():
                    out[f"{regime}_{name}"] = float(np.asarray(scorer([draft]))[0])
                out[f"{regime}_written"] = (agent.backend.write([example], exemplars)[0]
                                              if text_mode and question["split"] == written_split else "")
            rows.append(out)
            progress.update(1)
        return rows

    build_shards(Path(directory), len(questions), shard_size, produce, features)
    progress.close()
    return load_shards(directory, f"No agent cache in {directory}.")


@dataclass
class PolicyOutcome:
    """Per question: the action ('answer', 'lookup_answer', 'decline') and whether the answer given was right."""

    name: str
    actions: np.ndarray
    right: np.ndarray
    seconds: np.ndarray
    lookups: np.ndarray
    thresholds: Optional[dict[str, float]] = None

    def summary(self, never: PolicyOutcome, always: PolicyOutcome) -> dict[str, Any]:
        n = len(self.actions)
        answered = self.actions != "decline"
        lookups = self.lookups
        right, committed = int(self.right.sum()), int(answered.sum())
        return {
            "policy": self.name, "n": n, "pass_rate": right / n, "pass_rate_ci": wilson_interval(right, n),
            "coverage": committed / n, "selective_accuracy": right / committed if committed else math.nan,
            "selective_accuracy_ci": wilson_interval(right, committed), "declines": int((~answered).sum()),
            "lookups_per_question": float(lookups.mean()), "model_passes_per_question": float(1 + lookups.mean()),
            "seconds_per_question": float(self.seconds.mean()),
            "rescued_vs_never": int((self.right & ~never.right).sum()),
            "broke_vs_never": int((~self.right & never.right).sum()),
            "rescued_vs_always": int((self.right & ~always.right).sum()),
            "broke_vs_always": int((~self.right & always.right).sum()),
            "thresholds": self.thresholds,
        }


@dataclass
class AgentComparison:
    """Policies on the test questions of a cache (`split`), thresholds calibrated on its `calibration` split."""

    cache: datasets.Dataset
    scorers: Sequence[str]
    split: str = "test"
    calibration: str = "val"
    target_risk: Optional[float] = None
    delta: float = 0.1
    seed: int = 0
    outcomes: dict[str, PolicyOutcome] = field(default_factory=dict)

    def rows(self, split: str) -> dict[str, np.ndarray]:
        part = self.cache.filter(lambda r: r["split"] == split)
        return {name: np.asarray(part[name]) for name in part.column_names if name not in ("passages", "answers")}

    def policy(self, name: str, lookup: np.ndarray, answer_open: np.ndarray, data: dict[str, np.ndarray],
               thresholds: Optional[dict] = None, answer_closed: Optional[np.ndarray] = None) -> PolicyOutcome:
        """Look up where `lookup`; then answer if `answer_open` (else decline); closed-book answers where
        `answer_closed` (default: wherever there was no lookup)."""
        answer_closed = ~lookup if answer_closed is None else answer_closed & ~lookup
        actions = np.where(lookup, np.where(answer_open, "lookup_answer", "decline"),
                           np.where(answer_closed, "answer", "decline"))
        right = np.where(actions == "answer", data["closed_correct"],
                         np.where(actions == "lookup_answer", data["open_correct"], False)).astype(bool)
        seconds = data["closed_seconds"] + np.where(lookup, data["open_seconds"], 0.0)
        outcome = PolicyOutcome(name, actions, right, seconds, lookup.astype(bool), thresholds)
        self.outcomes[name] = outcome
        return outcome

    def run(self) -> dict[str, Any]:
        data, cal = self.rows(self.split), self.rows(self.calibration)
        n = len(data["id"])
        everyone, nobody = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        never = self.policy("never-lookup", nobody, nobody, data)
        always = self.policy("always-lookup", everyone, everyone, data)
        self.policy("oracle gate (lookup iff closed-book wrong)", ~data["closed_correct"], everyone, data)
        frontiers = {}
        for scorer in self.scorers:
            frontiers[scorer] = frontier(data["closed_correct"], data["open_correct"], data[f"closed_{scorer}"])
        oracle_rate = float((~data["closed_correct"]).mean())
        rate = {scorer: self.matched_rate(data, scorer, float(always.right.mean())) for scorer in self.scorers}
        for scorer in self.scorers:
            gate = self.gate(data[f"closed_{scorer}"], rate[scorer]["lookup_rate"])
            self.policy(f"{scorer} gate, matching always-lookup", gate, everyone, data,
                        {"lookup_rate": rate[scorer]["lookup_rate"]})
        rng = np.random.default_rng(self.seed)
        doubter_rate = rate.get("doubter", rate[self.scorers[0]])["lookup_rate"]
        self.policy("random gate at the Doubter's lookup rate", rng.random(n) < doubter_rate, everyone, data)
        if any(data["closed_written"]):
            from ..data.scoring import is_refusal

            refused = np.array([is_refusal(t) for t in data["closed_written"]])
            refused_again = np.array([is_refusal(t) for t in data["open_written"]])
            self.policy("text mode (pass 2 wrote the refusal -> look up -> decline)", refused, ~refused_again, data)
        calibrated = {}
        for scorer in self.scorers:
            calibrated[scorer] = self.calibrated(scorer, data, cal)
        summaries = {name: o.summary(never, always) for name, o in self.outcomes.items()}
        comparisons = self.paired(data)
        per_question = {"id": data["id"].tolist(), "closed_correct": data["closed_correct"].tolist(),
                        "open_correct": data["open_correct"].tolist(),
                        "confidence": {f"{regime}_{scorer}": data[f"{regime}_{scorer}"].tolist()
                                       for regime in REGIMES for scorer in self.scorers},
                        "actions": {name: o.actions.tolist() for name, o in self.outcomes.items()},
                        "lookups": {name: o.lookups.tolist() for name, o in self.outcomes.items()},
                        "right": {name: o.right.tolist() for name, o in self.outcomes.items()}}
        return {"n": n, "split": self.split, "calibration_split": self.calibration,
                "closed_book_accuracy": float(data["closed_correct"].mean()),
                "open_book_accuracy": float(data["open_correct"].mean()), "oracle_lookup_rate": oracle_rate,
                "policies": summaries, "frontiers": frontiers, "frontier_paired": self.frontier_paired(data),
                "matched": rate, "calibrated": calibrated, "paired": comparisons, "per_question": per_question}

    @staticmethod
    def gate(confidence: np.ndarray, lookup_rate: float) -> np.ndarray:
        """Look up for the `lookup_rate` least confident questions (ties by order, deterministic)."""
        count = round(lookup_rate * len(confidence))
        order = np.argsort(confidence, kind="stable")
        chosen = np.zeros(len(confidence), dtype=bool)
        chosen[order[:count]] = True
        return chosen

    def matched_rate(self, data: dict[str, np.ndarray], scorer: str, goal: float) -> dict[str, float]:
        """The fewest lookups (least confident first) at which a gate by `scorer` reaches accuracy `goal`
        (always-lookup's); the saving is the share of lookups avoided."""
        n = len(data["id"])
        order = np.argsort(data[f"closed_{scorer}"], kind="stable")
        closed, opened = data["closed_correct"][order], data["open_correct"][order]
        right = closed.sum() + np.concatenate([[0], np.cumsum(opened.astype(int) - closed.astype(int))])
        reached = np.nonzero(right / n >= goal - 1e-12)[0]
        count = int(reached[0]) if len(reached) else n
        return {"lookup_rate": count / n, "lookups_saved": 1 - count / n, "accuracy": float(right[count] / n)}

    def calibrated(self, scorer: str, data: dict[str, np.ndarray], cal: dict[str, np.ndarray]) -> dict[str, Any]:
        """The two-threshold policy: the closed-book threshold certified by Learn-then-Test on the calibration
        questions, the open-book one on those of them that reach the lookup, both at the same target risk
        (default: half the closed-book error rate of the calibration questions... bounded below by 0.05)."""
        target = self.target_risk
        if target is None:
            target = max(0.05, float(1 - cal["open_correct"].mean()) / 2)
        closed = calibrate(target, cal[f"closed_{scorer}"], cal["closed_correct"], delta=self.delta)
        reach = cal[f"closed_{scorer}"] < closed.threshold
        opened = (calibrate(target, cal[f"open_{scorer}"][reach], cal["open_correct"][reach], delta=self.delta)
                  if reach.any() else None)
        tau_open = opened.threshold if opened is not None else math.inf
        lookup = data[f"closed_{scorer}"] < closed.threshold
        answer_open = data[f"open_{scorer}"] >= tau_open
        outcome = self.policy(f"{scorer}, calibrated two thresholds", lookup, answer_open, data,
                              {"closed": closed.threshold, "open": tau_open, "target_risk": target})
        answered = outcome.actions != "decline"
        realised = 1 - outcome.right[answered].mean() if answered.any() else math.nan
        return {"target_risk": target, "closed": closed.to_dict(), "open": opened.to_dict() if opened else None,
                "calibration_reaching_lookup": int(reach.sum()), "realised_risk": float(realised),
                "within_target": bool(realised <= target) if answered.any() else None,
                "coverage": float(answered.mean()),
                "closed_realised": realized(closed.threshold, data[f"closed_{scorer}"],
                                            data["closed_correct"]).to_dict()}

    def frontier_paired(self, data: dict[str, np.ndarray]) -> dict[str, Any]:
        """Paired-bootstrap differences of frontier area: the Doubter's (else the first scorer's) minus each other
        scorer's, on the same questions."""
        reference = "doubter" if "doubter" in self.scorers else self.scorers[0]

        def area_gap(closed: np.ndarray, opened: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> float:
            return frontier(closed, opened, mine)["area"] - frontier(closed, opened, theirs)["area"]

        out = {}
        for other in self.scorers:
            if other != reference:
                arrays = (data["closed_correct"], data["open_correct"], data[f"closed_{reference}"],
                          data[f"closed_{other}"])
                low, high = bootstrap_ci(area_gap, *arrays, seed=self.seed)
                out[f"{reference} - {other}"] = {"diff": area_gap(*arrays), "ci_low": low, "ci_high": high}
        return out

    def paired(self, data: dict[str, np.ndarray]) -> dict[str, Any]:
        """Paired-bootstrap differences of pass rate: the Doubter's policies against the others."""
        out = {}
        ones = np.ones(len(data["id"]))
        doubter = [name for name in self.outcomes if name.startswith("doubter")]
        for name in doubter:
            for other in self.outcomes:
                if other == name:
                    continue
                diff = paired_bootstrap_diff(lambda c, s: float(np.mean(s)), ones, self.outcomes[name].right,
                                             self.outcomes[other].right, seed=self.seed)
                out[f"{name} - {other}"] = diff
        return out


def frontier(closed_correct: np.ndarray, open_correct: np.ndarray, confidence: np.ndarray) -> dict[str, Any]:
    """Accuracy against lookup rate when the least confident questions are looked up first (answers always given):
    the points and the area under the curve (lookup rate 0 to 1)."""
    n = len(confidence)
    order = np.argsort(confidence, kind="stable")
    gain = open_correct[order].astype(int) - closed_correct[order].astype(int)
    accuracy = (closed_correct.sum() + np.concatenate([[0], np.cumsum(gain)])) / n
    rates = np.arange(n + 1) / n
    return {"lookup_rate": rates.tolist(), "accuracy": accuracy.tolist(),
            "area": float(np.trapezoid(accuracy, rates))}


def write_report(result: dict[str, Any], directory: Path) -> None:
    """report.json, report.md and frontier.png."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "report.json", result)
    lines = [f"# Agent comparison ({result['n']} {result['split']} questions)", "",
             (f"Closed-book accuracy {result['closed_book_accuracy']:.3f}, with the lookup "
              f"{result['open_book_accuracy']:.3f}; an oracle gate looks up {result['oracle_lookup_rate']:.1%} of "
              "the questions."), "",
             ("| Policy | Pass rate [95% CI] | Sel. acc. | Coverage | Declines | Lookups/q | Passes/q | s/q | "
              "Rescued / broke vs never | vs always |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["policies"].values():
        lines.append(f"| {s['policy']} | {s['pass_rate']:.3f} [{s['pass_rate_ci'][0]:.3f}, {s['pass_rate_ci'][1]:.3f}] "
                     f"| {s['selective_accuracy']:.3f} | {s['coverage']:.3f} | {s['declines']} | "
                     f"{s['lookups_per_question']:.3f} | {s['model_passes_per_question']:.2f} | "
                     f"{s['seconds_per_question']:.2f} | {s['rescued_vs_never']} / {s['broke_vs_never']} | "
                     f"{s['rescued_vs_always']} / {s['broke_vs_always']} |")
    lines += ["", "| Scorer | Frontier area | Lookups to reach always-lookup's accuracy | Saved |", "|---|---|---|---|"]
    for scorer, f in result["frontiers"].items():
        m = result["matched"][scorer]
        lines.append(f"| {scorer} | {f['area']:.4f} | {m['lookup_rate']:.3f} | {m['lookups_saved']:.1%} |")
    lines += ["", "| Frontier area, paired | Difference [95% CI] |", "|---|---|"]
    for pair, d in result["frontier_paired"].items():
        lines.append(f"| {pair} | {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |")
    lines += ["", "| Calibrated policy | Target risk | Realised risk | Coverage | Within target |", "|---|---|---|---|---|"]
    for scorer, c in result["calibrated"].items():
        lines.append(f"| {scorer} | {c['target_risk']:.3f} | {c['realised_risk']:.3f} | {c['coverage']:.3f} | "
                     f"{c['within_target']} |")
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    axis = figure.add_subplot(1, 1, 1)
    for scorer, f in result["frontiers"].items():
        axis.plot(f["lookup_rate"], f["accuracy"], label=f"{scorer} (area {f['area']:.3f})")
    axis.set(xlabel="lookup rate (least confident first)", ylabel="accuracy (all questions answered)")
    axis.set_title("Accuracy vs lookups")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(directory / "frontier.png", dpi=120)


def varied_thresholds(rows: Sequence[dict], scorer: str) -> Thresholds:
    """Thresholds at the median confidences of `rows` (closed-book, then after the lookup of those below it), so that
    a live check meets every action (answer, look up and answer, decline) rather than one: calibrated thresholds
    that certify nothing would decline every question."""
    closed = np.array([r[f"closed_{scorer}"] for r in rows])
    tau_closed = float(np.median(closed))
    opened = np.array([r[f"open_{scorer}"] for r in rows])[closed < tau_closed]
    return Thresholds(tau_closed, float(np.median(opened)) if len(opened) else 0.0)


def agreement(agent: MetaAgent, thresholds: Thresholds, cache_rows: Sequence[dict], scorer: str) -> dict[str, Any]:
    """Run the live agent on cached questions and compare its actions and answers with the simulation."""
    agent.thresholds = thresholds
    matches, details = 0, []
    for row in cache_rows:
        live = agent.run(row["question"])
        lookup = row[f"closed_{scorer}"] < thresholds.closed
        simulated = ("lookup_answer" if row[f"open_{scorer}"] >= thresholds.open else "decline") if lookup else "answer"
        text = {"answer": row["closed_answer"], "lookup_answer": row["open_answer"]}.get(simulated, live.text)
        same = live.action == simulated and live.text == text
        matches += same
        details.append({"id": row["id"], "live": live.action, "simulated": simulated, "same": same})
    return {"questions": len(cache_rows), "matching": matches, "details": details}


def load_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
