"""A run directory ties the stages together: `collect` writes `run.json` (model, layers, dataset, splits), `train`,
`eval`, `ask`, `export` and `push` read it, so later stages need only the run directory.

    run_dir/run.json          the manifest
    run_dir/cache/            the activation cache (resumable shards)
    run_dir/checkpoints/      trainer checkpoints (resumable)
    run_dir/adapter/          the trained adapter (safetensors)
    run_dir/eval/             report.json, report.md, risk_coverage.png
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from peft import PeftModel, get_peft_model

from . import backbone, evaluation
from .baselines import answer_probability_scores, baseline_confidences, random_confidence
from .base_models import load_base_model
from .collect import (CollectConfig, cache_identity, check_cache_identity, collect, load_cache, make_judge,
                      stop_token_ids)
from .config import DoubterConfig
from .data import BENCHMARKS, load_benchmark, load_user_dataset
from .prompts import PromptConfig
from .report import EvaluationReport, plot_risk_coverage
from .risk_control import calibrate, realized
from .scoring import ExactMatchJudge
from .splits import assert_disjoint, check_no_overlap, split_by_question
from .targets import build_training_set, gold_answer
from .trainer_config import DoubterSFTConfig

MANIFEST = "run.json"
DOUBTER_USER_FIELDS = DoubterConfig.user_fields()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {MANIFEST}: run `peft-doubter collect --run-dir {run_dir}` first.")
    return json.loads(path.read_text())


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(run_dir) / MANIFEST
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2, default=str))
    partial.replace(path)


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"`dtype` must be one of {sorted(dtypes)}, got {name!r}.")
    return dtypes[name]


def load_base(collect_config: CollectConfig):
    """The run's frozen base model and tokenizer."""
    quantization = None
    if collect_config.quantization is not None:
        from transformers import BitsAndBytesConfig

        quantization = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=_dtype(collect_config.dtype))
            if collect_config.quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
        )
    return load_base_model(collect_config.model, dtype=_dtype(collect_config.dtype), quantization_config=quantization)


def load_questions(config: CollectConfig) -> datasets.Dataset:
    if config.dataset in BENCHMARKS:
        return load_benchmark(config.dataset, split=config.dataset_split)
    path = Path(config.dataset)
    if not path.exists():
        raise ValueError(
            f"Unknown dataset {config.dataset!r}: not a benchmark ({', '.join(BENCHMARKS)}) and no such file."
        )
    if path.is_file() and not path.read_text(errors="replace").strip():
        raise ValueError(f"Dataset file {path} is empty.")
    return load_user_dataset(config.dataset, question_column=config.question_column,
                             answer_column=config.answer_column, choices_column=config.choices_column,
                             label_column=config.label_column)


def sample_and_split(questions: datasets.Dataset, collect_config: CollectConfig, k_shot: int
                     ) -> tuple[datasets.Dataset, list[dict], dict[str, Any]]:
    """Seeded sample with a disjoint exemplar pool (the first `k_shot` shuffled questions) and a question-level
    train/val/test split checked for overlap. Returns the questions (with a `split` column), the exemplars and the
    split manifest."""
    if len(questions) == 0:
        raise ValueError(f"Dataset {collect_config.dataset!r} is empty.")
    shuffled = questions.shuffle(seed=collect_config.sample_seed)
    exemplars = [dict(row) for row in shuffled.select(range(min(k_shot, len(shuffled))))]
    rest = shuffled.select(range(len(exemplars), len(shuffled)))
    if collect_config.limit is not None:
        rest = rest.select(range(min(collect_config.limit, len(rest))))
    if len(rest) < 10:
        raise ValueError(f"Only {len(rest)} questions left after taking {len(exemplars)} exemplars; need >= 10.")
    train_fraction = 1 - collect_config.val_fraction - collect_config.test_fraction
    splits, manifest = split_by_question(
        rest, {"train": train_fraction, "val": collect_config.val_fraction, "test": collect_config.test_fraction},
        seed=collect_config.sample_seed,
    )
    check_no_overlap(splits)
    check_no_overlap({"exemplars": exemplars, "questions": rest})
    assert_disjoint([e["id"] for e in exemplars], rest["id"])
    manifest["exemplar_ids"] = [e["id"] for e in exemplars]
    parts = [ds.add_column("split", [name] * len(ds)) for name, ds in splits.items()]
    return datasets.concatenate_datasets(parts), exemplars, manifest


def _doubter_config(values: dict[str, Any]) -> DoubterConfig:
    unknown = sorted(set(values) - set(DOUBTER_USER_FIELDS))
    if unknown:
        raise ValueError(f"Unknown Doubter settings {unknown}.")
    return DoubterConfig(**values)


def collect_run(run_dir: Path, collect_config: CollectConfig, prompt_config: PromptConfig,
                doubter_values: dict[str, Any]) -> datasets.Dataset:
    """Stage 1: answer the sampled questions with the frozen base and cache pass-1 activations."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    doubter_config = _doubter_config(doubter_values)
    manifest_path = run_dir / MANIFEST
    if manifest_path.exists():
        previous = read_manifest(run_dir)
        if previous["collect"]["model"] != collect_config.model:
            raise ValueError(
                f"{run_dir} was made for base model {previous['collect']['model']!r}, not {collect_config.model!r}: "
                "use another --run-dir."
            )
    questions, exemplars, split_manifest = sample_and_split(load_questions(collect_config), collect_config,
                                                            prompt_config.k_shot)
    base, tokenizer = load_base(collect_config)
    model = get_peft_model(base, doubter_config).eval()
    plan = model.base_model._plans["default"]
    manifest = {
        "version": 1,
        "collect": dataclasses.asdict(collect_config),
        "prompt": dataclasses.asdict(prompt_config),
        "doubter": {name: getattr(doubter_config, name) for name in DOUBTER_USER_FIELDS},
        "read_layers": plan.read,
        "inject_layers": plan.inject,
        "base_fingerprint": backbone.fingerprint(base),
        "splits": split_manifest,
        "exemplars": exemplars,
        "cache": "cache",
    }
    identity = cache_identity(base, plan.read, doubter_config.pooling, prompt_config, collect_config,
                              split_manifest["exemplar_ids"], doubter_config.read_position)
    check_cache_identity(run_dir / "cache", identity)  # before the manifest is touched: a refusal changes nothing
    write_manifest(run_dir, manifest)
    cache = collect(model, tokenizer, questions, run_dir / "cache", identity, prompt_config, exemplars,
                    collect_config)
    manifest["cache_summary"] = {
        split: {"questions": int(sum(1 for s in cache["split"] if s == split)),
                "base_accuracy": float(sum(c for s, c in zip(cache["split"], cache["correct"]) if s == split)
                                       / max(1, sum(1 for s in cache["split"] if s == split)))}
        for split in ("train", "val", "test")
    }
    manifest["cache_summary"]["prompts_truncated"] = int(sum(cache["prompt_truncated"]))
    write_manifest(run_dir, manifest)
    return cache


def load_run_model(run_dir: Path, adapter: bool = True, doubter_values: Optional[dict[str, Any]] = None):
    """(PeftModel, tokenizer, manifest) of a run: the base with the trained adapter, or a fresh Doubter built from
    `doubter_values` (default: the manifest's settings)."""
    manifest = read_manifest(run_dir)
    collect_config = CollectConfig(**manifest["collect"])
    base, tokenizer = load_base(collect_config)
    problems = backbone.fingerprint_mismatch(manifest["base_fingerprint"], backbone.fingerprint(base))
    if problems:
        raise ValueError(f"{run_dir} was made for another base model: " + "; ".join(problems))
    adapter_dir = Path(run_dir) / manifest.get("adapter", "adapter")
    if adapter:
        if not (adapter_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"{run_dir} has no trained adapter: run `peft-doubter train --run-dir {run_dir}`.")
        model = PeftModel.from_pretrained(base, adapter_dir)
    else:
        model = get_peft_model(base, _doubter_config(doubter_values or manifest["doubter"]))
    return model.eval(), tokenizer, manifest


def train_run(run_dir: Path, training_args: DoubterSFTConfig, doubter_overrides: Optional[dict[str, Any]] = None):
    """Stage 2: train the Doubter on the cached train split (early stopping on val), resuming from the last
    checkpoint when one exists, and save the adapter."""
    from .trainer import DoubterTrainer

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    read_side = {"target_layers", "pooling", "read_position"} & set(doubter_overrides or {})
    changed = [k for k in read_side if doubter_overrides[k] != manifest["doubter"][k]]
    if changed:
        raise ValueError(f"{changed} were fixed at collection (the cache holds those layers); collect a new run.")
    manifest["doubter"].update(doubter_overrides or {})
    model, tokenizer, _ = load_run_model(run_dir, adapter=False, doubter_values=manifest["doubter"])
    cache = load_cache(run_dir / manifest["cache"])
    prompt = PromptConfig(**manifest["prompt"])
    config = model.peft_config["default"]
    rows = build_training_set(cache, tokenizer, config, prompt.mc_format, prompt.style == "chat",
                              seed=manifest["collect"]["sample_seed"])
    split = cache["split"]
    train = rows.select([i for i, s in enumerate(split) if s == "train"])
    val = rows.select([i for i, s in enumerate(split) if s == "val"])
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"The cache of {run_dir} has no train or no val questions.")
    if not any(train["correct"]) or all(train["correct"]):
        warnings.warn("Every training question has the same pass-1 correctness: the Doubter can only learn to "
                      "always answer or always decline.")
    training_args.output_dir = str(run_dir / "checkpoints")
    trainer = DoubterTrainer(model, training_args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    if not trainer.is_world_process_zero():  # under `accelerate launch` only the main process writes
        return trainer
    model.save_pretrained(run_dir / "adapter")
    manifest["adapter"] = "adapter"
    manifest["train"] = {
        "args": {k: v for k, v in training_args.to_dict().items() if not k.startswith("_")},
        "resumed_from": str(checkpoints[-1]) if checkpoints else None,
        "metrics": result.metrics,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "log_history": trainer.state.log_history,
        "train_questions": len(train),
        "val_questions": len(val),
    }
    write_manifest(run_dir, manifest)
    return trainer


def _eval_questions(run_dir: Path, manifest: dict[str, Any], config: evaluation.EvalConfig
                    ) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """(train, val, test rows, manifest of the test questions). Train and val come from the run itself; the test
    questions from its cache or, for a zero-shot cross-domain test, from another run's cache (same base and
    read layers) given as `questions_from`."""
    cache = load_cache(run_dir / manifest["cache"])
    split = cache["split"]
    train = [cache[i] for i, s in enumerate(split) if s == "train"]
    val = [cache[i] for i, s in enumerate(split) if s == "val"]
    source, source_manifest = cache, manifest
    if config.questions_from:
        source_manifest = read_manifest(Path(config.questions_from))
        for key in ("read_layers", "base_fingerprint"):
            if source_manifest[key] != manifest[key]:
                raise ValueError(f"{config.questions_from} was collected with a different {key} than {run_dir}.")
        for key, default in (("pooling", None), ("read_position", "prompt")):  # read_position: older manifests lack it
            if source_manifest["doubter"].get(key, default) != manifest["doubter"].get(key, default):
                raise ValueError(f"{config.questions_from} was collected with a different {key} than {run_dir}.")
        source = load_cache(Path(config.questions_from) / source_manifest["cache"])
    wanted = [i for i, s in enumerate(source["split"]) if config.eval_split in ("all", s)]
    test = [source[i] for i in wanted[: config.max_questions]]
    if not test:
        raise ValueError(f"No cached questions in split {config.eval_split!r}.")
    return train, val, test, source_manifest


def _paired_auroc_table(report: EvaluationReport, correct: np.ndarray, scores: dict[str, np.ndarray],
                        config: evaluation.EvalConfig) -> str:
    """Markdown: the Doubter's AUROC minus each baseline's, with paired-bootstrap CIs on the same questions."""
    from .metrics import auroc, paired_bootstrap_diff

    lines = ["", "## Doubter minus baseline (AUROC, paired bootstrap over the same questions)", "",
             "| Baseline | Difference | 95% CI | p |", "|---|---|---|---|"]
    diffs = {}
    for name, baseline in scores.items():
        if name == "doubter":
            continue
        diff = paired_bootstrap_diff(auroc, correct, scores["doubter"], baseline, n_resamples=config.n_resamples,
                                     seed=config.bootstrap_seed)
        diffs[name] = diff
        lines.append(f"| {name} | {diff['diff']:+.3f} | [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] | "
                     f"{diff['pvalue']:.3f} |")
    report.meta["paired_auroc_vs_baselines"] = diffs
    return "\n".join(lines) + "\n"


def eval_run(run_dir: Path, config: evaluation.EvalConfig, model=None, tokenizer=None) -> EvaluationReport:
    """Stage 3: the Doubter and every baseline on the same held-out questions; writes
    `<output_name>/report.{json,md}` and the risk–coverage plot."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if model is None:
        model, tokenizer, manifest = load_run_model(run_dir)
    train, val, test, test_manifest = _eval_questions(run_dir, manifest, config)
    prompt = PromptConfig(**test_manifest["prompt"])
    chat, mc_format = prompt.style == "chat", prompt.mc_format
    refusal = model.peft_config[model.active_adapter].refusal_text
    correct = np.array([row["correct"] for row in test], dtype=bool)

    confidence = evaluation.doubter_confidence(model, tokenizer, test, refusal, mc_format, chat,
                                               config.eval_batch_size)
    report = EvaluationReport(title=f"Doubter evaluation: {manifest['collect']['model']} trained on "
                                    f"{manifest['collect']['dataset']}, tested on "
                                    f"{test_manifest['collect']['dataset']} ({config.eval_split})")
    report.meta = {"run_dir": str(run_dir), "questions_from": config.questions_from, "split": config.eval_split,
                   "n": len(test), "train_questions": len(train), "eval_config": dataclasses.asdict(config)}
    action_kwargs: dict[str, Any] = {}
    if config.generate_text:
        judge = make_judge(test_manifest["collect"]["judge"])
        actions, right, changed, texts = evaluation.generate_actions(model, tokenizer, test, config, refusal, judge,
                                                                     chat, mc_format)
        action_kwargs = {"action": actions, "correction_correct": right}
        answered = [(c, r) for a, c, r in zip(actions, changed, right) if a == "answered"]
        report.meta["answered_differently"] = sum(c for c, _ in answered)
        report.meta["answered_differently_right"] = sum(c and r for c, r in answered)
        report.meta["examples"] = [
            {"question": row["question"], "gold": gold_answer(row, mc_format), "pass1": row["pass1_answer"],
             "pass1_correct": bool(row["correct"]), "doubter": text, "action": action}
            for row, text, action in list(zip(test, texts, actions))[:40]
        ]
    report.add_method("doubter", correct, confidence, n_resamples=config.n_resamples, seed=config.bootstrap_seed,
                      **action_kwargs)
    hidden = lambda rows: np.stack([np.asarray(r["features"]).reshape(-1) for r in rows])  # noqa: E731
    try:
        baselines = baseline_confidences(evaluation.pass_one_features(train), [r["correct"] for r in train],
                                         evaluation.pass_one_features(test), hidden(train), hidden(test),
                                         seed=config.bootstrap_seed)
    except ValueError as error:  # e.g. a train split with one class: no probe can be fit
        report.meta["skipped_baselines"] = str(error)
        baselines = {"random": random_confidence(len(test), seed=config.bootstrap_seed),
                     **answer_probability_scores(evaluation.pass_one_features(test))}
    for name, scores in baselines.items():
        report.add_method(name, correct, scores, n_resamples=config.n_resamples, seed=config.bootstrap_seed)

    val_confidence = evaluation.doubter_confidence(model, tokenizer, val, refusal, mc_format, chat,
                                                   config.eval_batch_size)
    val_correct = np.array([row["correct"] for row in val], dtype=bool)
    target = config.target_risk if config.target_risk is not None else (1 - val_correct.mean()) / 2
    result = calibrate(target, val_confidence, val_correct, delta=config.delta)
    report.add_risk_control("doubter", result, realized(result.threshold, confidence, correct))
    if config.risk_sweep:
        for sweep_target in np.arange(0.05, 1 - val_correct.mean(), 0.05).round(2):
            if not np.isclose(sweep_target, target):
                swept = calibrate(float(sweep_target), val_confidence, val_correct, delta=config.delta)
                report.add_risk_control("doubter", swept, realized(swept.threshold, confidence, correct))

    # Per-question scores, so a report can be re-analysed (other thresholds, other metrics) without the model.
    report.meta["scores"] = {"test": {name: [round(float(x), 6) for x in scores] for name, scores in
                                      {"doubter": confidence, **baselines}.items()},
                             "val_doubter": [round(float(x), 6) for x in val_confidence],
                             "val_correct": val_correct.tolist()}
    paired = _paired_auroc_table(report, correct, {"doubter": confidence, **baselines}, config)
    out = run_dir / config.output_name
    out.mkdir(exist_ok=True)
    report.to_json(out / "report.json")
    (out / "report.md").write_text(report.to_markdown() + paired)
    plot_risk_coverage(report, out / "risk_coverage.png")
    manifest.setdefault("evaluations", {})[config.output_name] = {
        "report": f"{config.output_name}/report.json", "threshold": result.threshold, "target_risk": target}
    write_manifest(run_dir, manifest)
    return report


@dataclasses.dataclass
class Answer:
    """What `ask` returns. `confidence` is the Doubter's confidence in the base's own answer (thresholded mode)."""

    text: str
    declined: bool
    confidence: Optional[float] = None


def calibrated_threshold(run_dir: Path, output_name: str = "eval") -> float:
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
    from .collect import collect_batch
    from .prompts import build_prompt, first_line
    from .scoring import is_refusal

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
        confidence = float(evaluation.doubter_confidence(model, tokenizer, rows, refusal, prompt_config.mc_format,
                                                         prompt_config.style == "chat", 1, progress=False)[0])
        declined = confidence < threshold
        return Answer(refusal if declined else rows[0]["pass1_answer"], declined, confidence)
    prompt = build_prompt(example, tokenizer, prompt_config, manifest["exemplars"])
    inputs = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=prompt_config.style != "chat")
    out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    text = first_line(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return Answer(text, is_refusal(text, refusal))


def show_examples(run_dir: Path) -> None:
    """Print one answered and one declined held-out question from the evaluation."""
    examples = json.loads((Path(run_dir) / "eval" / "report.json").read_text())["meta"].get("examples", [])
    for action in ("answered", "declined"):
        chosen = next((e for e in examples if e["action"] == action), None)
        if chosen is None:
            print(f"\nNo {action} question among the first {len(examples)} held-out examples.")
            continue
        verdict = "right" if chosen["pass1_correct"] else "wrong"
        print(f"\n[{action}] Q: {chosen['question']}\n  Doubter: {chosen['doubter']!r}\n  "
              f"base pass 1: {chosen['pass1']!r} ({verdict}); gold: {chosen['gold']!r}")
