"""The stages of a run directory: `collect` writes `run.json` (model, layers, dataset, splits); `train`, `eval`,
`export` (and `ask`, `push`) read it, so later stages need only the run directory.

    run_dir/run.json          the manifest
    run_dir/cache/            the activation cache (resumable shards)
    run_dir/checkpoints/      trainer checkpoints (resumable)
    run_dir/adapter/          the trained adapter (safetensors)
    run_dir/eval/             report.json, report.md, risk_coverage.png
    run_dir/doubter_sidecar.gguf  the GGUF sidecar for llama.cpp
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

import datasets
from peft import get_peft_model
from transformers import set_seed

from ..data.collection import (
    CollectConfig,
    cache_identity,
    cache_is_multiple_choice,
    check_cache_identity,
    collect,
    load_cache,
    make_judge,
)
from ..data.prefix_states import attach_prefix_states, prefix_states
from ..data.prompts import PromptConfig
from ..deploy.sidecar import doubter_tensors, not_exportable, write_sidecar
from ..evaluation.protocol import EvalConfig, evaluate_doubter
from ..evaluation.report import EvaluationReport, plot_risk_coverage
from ..names import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    CACHE_DIR,
    CACHE_MANIFEST,
    CHECKPOINTS_DIR,
    PREFIX_STATES_DIR,
    REPORT_JSON,
    REPORT_MARKDOWN,
    RISK_COVERAGE_PLOT,
    RUN_MANIFEST,
    SIDECAR_FILE,
)
from ..paths import check_writable, read_json, run_directory_lock
from ..training.config import DoubterSFTConfig
from ..training.targets import build_training_set
from ..tuner import backbone
from ..tuner.loading import load_saved_doubter
from .manifest import (
    DOUBTER_USER_FIELDS,
    READ_SIDE,
    build_doubter_config,
    collection_differences,
    injection_trained,
    load_base,
    load_questions,
    read_manifest,
    sample_and_split,
    source_summary,
    write_manifest,
)


def collect_run(run_dir: Path, collect_config: CollectConfig, prompt_config: PromptConfig,
                doubter_values: dict[str, Any]) -> datasets.Dataset:
    """Stage 1: answer the sampled questions with the frozen base and cache pass-1 activations."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    with run_directory_lock(run_dir):
        return _collect(run_dir, collect_config, prompt_config, doubter_values)


def _collect(run_dir: Path, collect_config: CollectConfig, prompt_config: PromptConfig,
             doubter_values: dict[str, Any]) -> datasets.Dataset:
    doubter_config = build_doubter_config(doubter_values)
    doubter_settings = {name: getattr(doubter_config, name) for name in DOUBTER_USER_FIELDS}
    if (run_dir / RUN_MANIFEST).exists():
        previous = read_manifest(run_dir)
        differences = collection_differences(previous, dataclasses.asdict(collect_config),
                                             dataclasses.asdict(prompt_config), doubter_settings)
        if differences:
            raise ValueError(f"{run_dir} holds a collection made with other settings ({'; '.join(differences)}): "
                             "repeat its options to resume it, or use another --run-dir.")
    questions, exemplars, split_manifest = sample_and_split(load_questions(collect_config), collect_config,
                                                            prompt_config.k_shot)
    base, tokenizer = load_base(collect_config)
    model = get_peft_model(base, doubter_config).eval()
    plan = model.base_model._plans["default"]
    manifest = {
        "version": 1,
        "collect": dataclasses.asdict(collect_config),
        "prompt": dataclasses.asdict(prompt_config),
        "doubter": doubter_settings,
        "read_layers": plan.read,
        "inject_layers": plan.inject,
        "base_fingerprint": backbone.fingerprint(base),
        "splits": split_manifest,
        "exemplars": exemplars,
        "cache": CACHE_DIR,
    }
    identity = cache_identity(base, plan.read, doubter_config.pooling, prompt_config, collect_config,
                              split_manifest["exemplar_ids"], doubter_config.read_position)
    check_cache_identity(run_dir / CACHE_DIR, identity)  # before the manifest is touched: a refusal changes nothing
    write_manifest(run_dir, manifest)
    cache = collect(model, tokenizer, questions, run_dir / CACHE_DIR, identity, prompt_config, exemplars,
                    collect_config)
    manifest["cache_summary"] = {
        split: {"questions": int(sum(1 for s in cache["split"] if s == split)),
                "base_accuracy": float(sum(c for s, c in zip(cache["split"], cache["correct"]) if s == split)
                                       / max(1, sum(1 for s in cache["split"] if s == split)))}
        for split in ("train", "val", "test")
    }
    manifest["cache_summary"]["prompts_truncated"] = int(sum(cache["prompt_truncated"]))
    manifest["data_sources"] = source_summary(questions, cache)
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
    adapter_dir = Path(run_dir) / manifest.get("adapter", ADAPTER_DIR)
    if adapter:
        if not (adapter_dir / ADAPTER_CONFIG).exists():
            raise FileNotFoundError(f"{run_dir} has no trained adapter: run `peft-doubter train --run-dir {run_dir}`.")
        model = load_saved_doubter(base, adapter_dir)
    else:
        model = get_peft_model(base, build_doubter_config(doubter_values or manifest["doubter"]))
    return model.eval(), tokenizer, manifest


def training_arguments(run_dir: Path, values: dict[str, Any]) -> DoubterSFTConfig:
    """`DoubterSFTConfig` with the run's checkpoint folder."""
    return DoubterSFTConfig(output_dir=str(Path(run_dir) / CHECKPOINTS_DIR), **values)


def train_run(run_dir: Path, train_values: Optional[dict[str, Any]] = None,
              doubter_overrides: Optional[dict[str, Any]] = None):
    """Stage 2: train the Doubter on the cached train split (checkpoints chosen on val), resuming from the last
    checkpoint when one exists, and save the adapter. `train_values` are `DoubterSFTConfig` fields and
    `doubter_overrides` `DoubterConfig` fields (the options given); a resumed run continues with the options it was
    started with (given again or not: other values are refused)."""
    run_dir = Path(run_dir)
    train_values, doubter_overrides = dict(train_values or {}), dict(doubter_overrides or {})
    manifest = read_manifest(run_dir)
    changed = [k for k in set(READ_SIDE) & set(doubter_overrides) if doubter_overrides[k] != manifest["doubter"][k]]
    if changed:
        raise ValueError(f"{changed} were fixed at collection (the cache holds those layers); collect a new run.")
    checkpoints = sorted((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    started = manifest.get("train_started")
    if checkpoints and started:
        conflicts = [f"{group}.{key}: started with {started[group].get(key)!r}, given {value!r}"
                     for group, given in (("train", train_values), ("doubter", doubter_overrides))
                     for key, value in given.items() if started[group].get(key, value) != value]
        if conflicts:
            raise ValueError(f"{run_dir} holds an interrupted training started with other options "
                             f"({'; '.join(conflicts)}): resume it with the same options, or delete "
                             f"{run_dir / CHECKPOINTS_DIR} to start again.")
        train_values, doubter_overrides = {**started["train"], **train_values}, {**started["doubter"],
                                                                                   **doubter_overrides}
    training_args = training_arguments(run_dir, train_values)
    main_process = training_args.process_index == 0
    if main_process:
        check_writable(run_dir)
    with run_directory_lock(run_dir) if main_process else contextlib.nullcontext():
        return _train(run_dir, manifest, training_args, train_values, doubter_overrides, checkpoints)


def _check_trained_on_this_base(run_dir: Path, manifest: dict[str, Any], base) -> None:
    """The cache, an adapter or checkpoints made on another base than run.json's are refused before anything is
    written (run.json edited, or files copied between runs)."""
    actual = backbone.fingerprint(base)
    sources = [run_dir / manifest["cache"] / CACHE_MANIFEST, run_dir / ADAPTER_DIR / ADAPTER_CONFIG,
               *sorted((run_dir / CHECKPOINTS_DIR).glob(f"checkpoint-*/{ADAPTER_CONFIG}"))]
    for source in sources:
        if not source.exists():
            continue
        data = read_json(source)
        stored = data.get("identity", {}).get("base_fingerprint") if "identity" in data else data.get(
            "base_fingerprint")
        problems = backbone.fingerprint_mismatch(stored, actual) if stored else []
        if problems:
            raise ValueError(f"{source} was made on another base model than {run_dir / RUN_MANIFEST} names "
                             f"({'; '.join(problems)}): nothing was changed. Use the run directory of that base.")


def _train(run_dir: Path, manifest: dict[str, Any], training_args: DoubterSFTConfig, train_values: dict[str, Any],
           doubter_overrides: dict[str, Any], checkpoints: list[Path]):
    from ..training.trainer import DoubterTrainer

    manifest["doubter"].update(doubter_overrides)
    set_seed(training_args.seed)  # the adapter's initial weights are part of the run (as with Trainer's model_init)
    model, tokenizer, _ = load_run_model(run_dir, adapter=False, doubter_values=manifest["doubter"])
    _check_trained_on_this_base(run_dir, manifest, model.base_model.model)
    cache = load_cache(run_dir / manifest["cache"])
    prompt = PromptConfig(**manifest["prompt"])
    config = model.peft_config["default"]
    rows = build_training_set(cache, tokenizer, config, prompt.mc_format, prompt.style == "chat",
                              seed=manifest["collect"]["sample_seed"])
    training_args.resolve_stages(config.confidence)
    if training_args.train_from_cache and training_args.train_injection:  # a head-only fit runs no pass 2
        with training_args.main_process_first(desc="caching lower-layer states"):  # other processes then read it
            rows = attach_prefix_states(model, rows, run_dir / PREFIX_STATES_DIR)
    split = cache["split"]
    train = rows.select([i for i, s in enumerate(split) if s == "train"])
    val = rows.select([i for i, s in enumerate(split) if s == "val"])
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"The cache of {run_dir} has no train or no val questions.")
    if not any(train["correct"]) or all(train["correct"]):
        warnings.warn("Every training question has the same pass-1 correctness: the Doubter can only learn to "
                      "always answer or always decline.")
    trainer = DoubterTrainer(model, training_args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    if trainer.is_world_process_zero():  # what a resumed run continues with
        write_manifest(run_dir, {**manifest, "train_started": {"train": train_values, "doubter": doubter_overrides}})
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    if not trainer.is_world_process_zero():  # under `accelerate launch` only the main process writes
        return trainer
    model.save_pretrained(run_dir / ADAPTER_DIR)
    manifest["adapter"] = ADAPTER_DIR
    manifest["train_started"] = {"train": train_values, "doubter": doubter_overrides}
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


def _eval_questions(run_dir: Path, manifest: dict[str, Any], config: EvalConfig, model=None, tokenizer=None
                    ) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """(train, val, test rows, manifest of the test questions). Train and val come from the run itself; the test
    questions from its cache or, for a zero-shot cross-domain test, from another run's cache (same base and
    read layers) given as `questions_from`. With `model`, the run's own val and test rows carry their cached
    lower-layer states when training cached them."""
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
    if model is not None:  # the lower-layer states training cached for every question of the run speed up scoring
        val_index = [i for i, s in enumerate(split) if s == "val"]
        own = dict(zip(val_index, val)) | ({} if config.questions_from else dict(zip(wanted, test)))
        _attach_cached_states(run_dir, manifest, model, tokenizer, cache, own)
    return train, val, test, source_manifest


def _attach_cached_states(run_dir: Path, manifest: dict[str, Any], model, tokenizer, cache: datasets.Dataset,
                          rows: dict[int, dict]) -> None:
    """Give the cached `rows` (by cache index) their lower-layer states from `run_dir`'s cache, when training built
    one for these sequences (otherwise scoring runs the full pass 2, with a warning when the cache is stale)."""
    directory = run_dir / PREFIX_STATES_DIR
    if not (directory / CACHE_MANIFEST).exists() or not rows:
        return
    prompt = PromptConfig(**manifest["prompt"])
    sequences = build_training_set(cache, tokenizer, model.peft_config[model.active_adapter], prompt.mc_format,
                                   prompt.style == "chat", seed=manifest["collect"]["sample_seed"])
    try:
        states = prefix_states(model, sequences, directory).with_format("numpy")
    except ValueError as error:
        warnings.warn(f"Scoring without the cached lower-layer states: {error}")
        return
    for index, row in rows.items():
        row["prefix_hidden"] = states[index]["prefix_hidden"]


def eval_run(run_dir: Path, config: EvalConfig, model=None, tokenizer=None) -> EvaluationReport:
    """Stage 3: the Doubter and every baseline on the same held-out questions; writes
    `<output_name>/report.{json,md}` and the risk–coverage plot, and records the calibrated threshold in run.json."""
    run_dir = Path(run_dir)
    check_writable(run_dir / config.output_name)
    with run_directory_lock(run_dir):
        return _evaluate(run_dir, config, model, tokenizer)


def _evaluate(run_dir: Path, config: EvalConfig, model, tokenizer) -> EvaluationReport:
    manifest = read_manifest(run_dir)
    if model is None:
        model, tokenizer, manifest = load_run_model(run_dir)
    train, val, test, test_manifest = _eval_questions(run_dir, manifest, config, model, tokenizer)
    prompt = PromptConfig(**test_manifest["prompt"])
    title = (f"Doubter evaluation: {manifest['collect']['model']} trained on {manifest['collect']['dataset']}, "
             f"tested on {test_manifest['collect']['dataset']} ({config.eval_split})")
    if config.text_behaviour == "two-pass" and not injection_trained(manifest):
        raise ValueError(f"{run_dir}'s injection was not trained (train_injection=False): its two-pass text is the "
                         "base's own. Evaluate it with --text-behaviour thresholded (what it writes) or none.")
    answer_read = model.peft_config[model.active_adapter].read_position == "answer"
    if config.text_behaviour == "two-pass" and answer_read and any(len(row["choices"]) for row in test):
        raise ValueError("Two-pass text of a multiple-choice question drafts an open answer, while the Doubter "
                         "read the chosen option: evaluate answer reading on multiple choice with --text-behaviour "
                         "thresholded (the chosen option or the refusal) or none.")
    judge = make_judge(test_manifest["collect"]["judge"]) if config.text_behaviour == "two-pass" else None
    report = evaluate_doubter(model, tokenizer, train, val, test, config, mc_format=prompt.mc_format,
                              chat=prompt.style == "chat", judge=judge, title=title,
                              meta={"run_dir": str(run_dir), "questions_from": config.questions_from,
                                    "split": config.eval_split})
    out = run_dir / config.output_name
    out.mkdir(exist_ok=True)
    report.to_json(out / REPORT_JSON)
    (out / REPORT_MARKDOWN).write_text(report.to_markdown())
    plot_risk_coverage(report, out / RISK_COVERAGE_PLOT)
    manifest.setdefault("evaluations", {})[config.output_name] = {
        "report": f"{config.output_name}/{REPORT_JSON}", **report.meta["calibrated"]}
    write_manifest(run_dir, manifest)
    return report


def export_run(run_dir: Path) -> Path:
    """`peft-doubter export`: the run's trained adapter as the GGUF sidecar `run_dir/doubter_sidecar.gguf`."""
    check_writable(Path(run_dir))
    with run_directory_lock(run_dir):
        model, _, manifest = load_run_model(Path(run_dir))
        reason = not_exportable(model.peft_config[model.active_adapter],
                                cache_is_multiple_choice(Path(run_dir) / manifest["cache"]))
        if reason:
            raise ValueError(f"{run_dir} cannot be exported: {reason}")
        tensors, metadata = doubter_tensors(model)
        return write_sidecar(Path(run_dir) / SIDECAR_FILE, tensors, metadata)
