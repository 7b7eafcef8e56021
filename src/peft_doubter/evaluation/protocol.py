"""The evaluation protocol: the Doubter and every baseline on exactly the same held-out questions, its text behaviour
apart from its ranking, the paired differences, and a risk-controlled threshold calibrated on the validation split
and checked on the test split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..data.prompts import gold_answer
from ..data.scoring import Judge
from ..names import EVAL_DIR, TEXT_BEHAVIOURS
from .baselines import answer_probability_scores, answer_token_summary, baseline_confidences, random_confidence
from .confidence import doubter_log_odds, generate_actions, pass1_answer_text, pass_one_features, sigmoid
from .metrics import auroc
from .report import EvaluationReport
from .risk_control import calibrate, realized
from .statistics import paired_bootstrap_diff


DOUBTER = "doubter"  # the report's name for the Doubter's own scores; every other method is a baseline
EXAMPLES_PER_ACTION = 3  # examples shown per written action (a seeded random sample of the test questions)


@dataclass
class EvalConfig:
    """How a run is evaluated."""

    eval_split: str = field(
        default="test", metadata={"help": "Cached split to evaluate (held out from training), or 'all'."}
    )
    questions_from: Optional[str] = field(
        default=None,
        metadata={"help": "Another run directory (same base and read layers) whose cached questions are the test "
                  "set: a zero-shot cross-domain test. Train and val still come from this run."},
    )
    output_name: str = field(default=EVAL_DIR, metadata={"help": "Folder of the run directory for the report."})
    target_risk: Optional[float] = field(
        default=None,
        metadata={"help": "Risk control target (error rate among answered). Default: half the base error rate."},
    )
    delta: float = field(default=0.1, metadata={"help": "Risk control: allowed probability of missing the target."})
    risk_sweep: bool = field(
        default=True,
        metadata={"help": "Also calibrate at every target risk 0.05, 0.10, ... below the validation error rate, to "
                  "show target against realised risk over the whole range (the first entry stays the main one)."},
    )
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for confidence intervals."})
    eval_batch_size: int = field(default=8, metadata={"help": "Questions per evaluation batch."})
    text_behaviour: str = field(
        default="thresholded",
        metadata={"help": f"The text written, reported beside the ranking: one of {TEXT_BEHAVIOURS}. 'thresholded' "
                  "is what `ask --threshold calibrated`, the agent and the server write (the base's own answer where "
                  "the confidence reaches the calibrated threshold, else the refusal; no generation); 'two-pass' "
                  "generates greedily with the adapter (a Doubter whose injection was trained); 'none' reports the "
                  "ranking only."},
    )
    max_answer_tokens: int = field(default=24, metadata={"help": "Longest generated answer in evaluation."})
    max_questions: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N questions."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the random baseline and the bootstrap."})
    n_jobs: Optional[int] = field(
        default=-1, metadata={"help": "Processes for the probes' cross-validation (-1: every core; none: one)."}
    )

    def __post_init__(self) -> None:
        if self.text_behaviour not in TEXT_BEHAVIOURS:
            raise ValueError(f"`text_behaviour` must be one of {TEXT_BEHAVIOURS}, got {self.text_behaviour!r}.")


def _hidden(rows: Sequence[dict]) -> np.ndarray:
    return np.stack([np.asarray(row["features"]).reshape(-1) for row in rows])


def _answer_summary(rows: Sequence[dict]) -> Optional[np.ndarray]:
    """What an answer-reading Doubter sees beyond the read position (every answer token's states and signals),
    summarised for the stacked baselines; None for questions without open answers."""
    if not rows or "answer_states" not in rows[0] or not any(len(row["answer_ids"]) for row in rows):
        return None
    return answer_token_summary([row["answer_states"] for row in rows], [row["token_signals"] for row in rows])


def _examples(test: Sequence[dict], texts: Sequence[str], actions: Sequence[str], right: Sequence[bool],
              log_odds: np.ndarray, mc_format: str, seed: int) -> list[dict[str, Any]]:
    """A seeded random sample of up to `EXAMPLES_PER_ACTION` test questions per written action, with what the
    Doubter wrote, its confidence and what the base answered."""
    rng = np.random.default_rng(seed)
    chosen = []
    for action in ("answered", "declined", "corrected"):
        indices = [i for i, a in enumerate(actions) if a == action]
        chosen += sorted(rng.choice(indices, size=min(EXAMPLES_PER_ACTION, len(indices)), replace=False).tolist())
    return [{"question": test[i]["question"], "gold": gold_answer(test[i], mc_format), "pass1": test[i]["pass1_answer"],
             "pass1_correct": bool(test[i]["correct"]), "doubter": texts[i], "action": actions[i],
             "written_correct": bool(right[i]), "confidence": float(sigmoid(log_odds[i])),
             "log_odds": float(log_odds[i])} for i in chosen]


def thresholded_text(rows: Sequence[dict], confidence: np.ndarray, threshold: float, refusal: str,
                     mc_format: str) -> tuple[list[str], list[bool], list[bool], list[str]]:
    """What the thresholded Doubter writes for cached questions (as `generate_actions` reports it): the base's own
    pass-1 answer where `confidence >= threshold`, judged when it was collected, else the refusal."""
    answered = [bool(c >= threshold) for c in confidence]
    actions = ["answered" if a else "declined" for a in answered]
    right = [a and bool(row["correct"]) for a, row in zip(answered, rows)]
    texts = [pass1_answer_text(row, mc_format) if a else refusal for a, row in zip(answered, rows)]
    return actions, right, [False] * len(rows), texts


def evaluate_doubter(model, tokenizer, train: Sequence[dict], val: Sequence[dict], test: Sequence[dict],
                     config: EvalConfig, *, mc_format: str, chat: bool, judge: Optional[Judge], title: str,
                     meta: dict[str, Any]) -> EvaluationReport:
    """Score the cached `test` questions with the Doubter and every baseline (probes fit on `train`), calibrate the
    decline threshold on `val`, and return the report. `judge` judges generated answers (needed for
    `config.text_behaviour='two-pass'`). The Doubter is ranked by its log-odds; thresholds are on its confidence in
    [0, 1]."""
    refusal = model.peft_config[model.active_adapter].refusal_text
    correct = np.array([row["correct"] for row in test], dtype=bool)
    log_odds = doubter_log_odds(model, tokenizer, test, refusal, mc_format, chat, config.eval_batch_size)
    confidence = sigmoid(log_odds)
    val_confidence = sigmoid(doubter_log_odds(model, tokenizer, val, refusal, mc_format, chat,
                                              config.eval_batch_size))
    val_correct = np.array([row["correct"] for row in val], dtype=bool)
    target = config.target_risk if config.target_risk is not None else (1 - val_correct.mean()) / 2
    result = calibrate(target, val_confidence, val_correct, delta=config.delta)
    report = EvaluationReport(title=title)
    report.meta = {**meta, "n": len(test), "train_questions": len(train), "eval_config": dataclasses.asdict(config),
                   "confidence": model.peft_config[model.active_adapter].confidence}
    action_kwargs: dict[str, Any] = {}
    if config.text_behaviour != "none":
        if config.text_behaviour == "two-pass":
            actions, right, changed, texts = generate_actions(model, tokenizer, test, config.eval_batch_size,
                                                              config.max_answer_tokens, refusal, judge, chat,
                                                              mc_format)
        else:
            actions, right, changed, texts = thresholded_text(test, confidence, result.threshold, refusal, mc_format)
        action_kwargs = {"action": actions, "written_correct": right, "answered_same": [not c for c in changed]}
        report.meta["written"] = [{"action": a, "text": t, "right": r} for a, t, r in zip(actions, texts, right)]
        report.meta["examples"] = _examples(test, texts, actions, right, log_odds, mc_format, config.bootstrap_seed)
    report.add_method(DOUBTER, correct, confidence, n_resamples=config.n_resamples, seed=config.bootstrap_seed,
                      scores=log_odds, **action_kwargs)
    summary_train, summary_test = _answer_summary(train), _answer_summary(test)
    try:
        baselines = baseline_confidences(pass_one_features(train), [r["correct"] for r in train],
                                         pass_one_features(test), _hidden(train), _hidden(test),
                                         seed=config.bootstrap_seed, extra_train=summary_train,
                                         extra_test=summary_test if summary_train is not None else None,
                                         n_jobs=config.n_jobs)
    except ValueError as error:  # e.g. a train split with one class: no probe can be fit
        report.meta["skipped_baselines"] = str(error)
        baselines = {"random": random_confidence(len(test), seed=config.bootstrap_seed),
                     **answer_probability_scores(pass_one_features(test))}
    for name, scores in baselines.items():
        report.add_method(name, correct, scores, n_resamples=config.n_resamples, seed=config.bootstrap_seed)

    report.add_risk_control(DOUBTER, result, realized(result.threshold, confidence, correct))
    if config.risk_sweep:
        for sweep_target in np.arange(0.05, 1 - val_correct.mean(), 0.05).round(2):
            if not np.isclose(sweep_target, target):
                swept = calibrate(float(sweep_target), val_confidence, val_correct, delta=config.delta)
                report.add_risk_control(DOUBTER, swept, realized(swept.threshold, confidence, correct))
    report.meta["validation"] = {"confidence": val_confidence.tolist(), "correct": val_correct.tolist()}
    report.meta["paired_auroc_vs_baselines"] = {
        name: paired_bootstrap_diff(auroc, correct, log_odds, scores, n_resamples=config.n_resamples,
                                    seed=config.bootstrap_seed)
        for name, scores in baselines.items()
    }
    report.meta["calibrated"] = {"threshold": result.threshold, "target_risk": target}
    return report
