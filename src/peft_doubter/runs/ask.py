"""Asking a trained run: greedy two-pass answers, or risk-controlled answers at the threshold `eval` certified."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..data.collection import CollectConfig, collect_batch, stop_token_ids
from ..data.prompts import PromptConfig, build_prompt, first_line
from ..data.scoring import ExactMatchJudge, is_refusal
from ..evaluation.confidence import doubter_log_odds, sigmoid
from ..names import EVAL_DIR, REPORT_JSON
from .manifest import read_manifest
from .stages import load_run_model


@dataclasses.dataclass
class Answer:
    """What `ask` returns. `confidence` is the Doubter's confidence in the base's own answer (thresholded mode)."""

    text: str
    declined: bool
    confidence: Optional[float] = None


def calibrated_threshold(run_dir: Path, output_name: str = EVAL_DIR) -> float:
    """The decline threshold certified by `peft-doubter eval` (Learn-then-Test on the validation split);
    `inf` when no threshold met the target risk, i.e. declining everything."""
    evaluations = read_manifest(run_dir).get("evaluations", {})
    if output_name not in evaluations:
        raise FileNotFoundError(f"{run_dir} has no calibrated threshold: run `peft-doubter eval --run-dir {run_dir}`.")
    return float(evaluations[output_name]["threshold"])


def ask(run_dir: Path, question: str, max_new_tokens: int = 32, model=None, tokenizer=None,
        threshold: Optional[float] = None) -> Answer:
    """The run's Doubter on one question.

    Without `threshold`: greedy two-pass generation. With one: the risk-controlled answer of the evaluation — the
    base's own greedy answer (pass 1) when the Doubter's confidence in it is at least `threshold`, else the refusal.
    The confidence is computed exactly as in `peft-doubter eval`, so a threshold from `calibrated_threshold` carries
    its guarantee (on questions from the same distribution)."""
    if not question.strip():
        raise ValueError("Empty question.")
    manifest = read_manifest(run_dir)
    if model is None:
        model, tokenizer, manifest = load_run_model(run_dir)
    prompt_config = PromptConfig(**manifest["prompt"])
    refusal = model.peft_config[model.active_adapter].refusal_text
    example = {"id": "ask", "question": question.strip(), "answers": [], "choices": [], "label": -1, "subject": "",
               "split": "ask"}
    if threshold is not None:
        collect_config = dataclasses.replace(CollectConfig(**manifest["collect"]), max_new_tokens=max_new_tokens)
        rows = collect_batch(model, tokenizer, [example], prompt_config, manifest["exemplars"],
                             ExactMatchJudge(), collect_config)  # no gold answers to judge against
        log_odds = doubter_log_odds(model, tokenizer, rows, refusal, prompt_config.mc_format,
                                    prompt_config.style == "chat", 1, progress=False)
        confidence = float(sigmoid(log_odds)[0])
        declined = confidence < threshold
        return Answer(refusal if declined else rows[0]["pass1_answer"], declined, confidence)
    prompt = build_prompt(example, tokenizer, prompt_config, manifest["exemplars"])
    inputs = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=prompt_config.style != "chat")
    out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    text = first_line(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return Answer(text, is_refusal(text, refusal))


def show_examples(run_dir: Path, output_name: str = EVAL_DIR) -> None:
    """Print the evaluation's examples: a seeded random sample of held-out questions per written action (answered,
    declined), each with the Doubter's confidence beside the calibrated threshold and what the base answered."""
    report = json.loads((Path(run_dir) / output_name / REPORT_JSON).read_text())
    examples = report["meta"].get("examples", [])
    threshold = report["meta"].get("calibrated", {}).get("threshold")
    shown = "declines everything" if threshold is None or threshold == float("inf") else f"{threshold:.3f}"
    print(f"\nExamples (a seeded random sample of the held-out questions; calibrated threshold: {shown}):")
    for action in ("answered", "declined", "corrected"):
        for example in (e for e in examples if e["action"] == action):
            base = "right" if example["pass1_correct"] else "wrong"
            written = "" if action == "declined" else f" ({'right' if example['written_correct'] else 'wrong'})"
            print(f"[{action}] Q: {example['question']}\n  Doubter wrote: {example['doubter']!r}{written}; "
                  f"confidence {example['confidence']:.3f}\n  base answered {example['pass1']!r} ({base}); gold: "
                  f"{example['gold']!r}")
