"""The run directory's manifest (`run.json`) and what it pins down: the base model, the questions with their seeded
question-level splits, the few-shot exemplars and the Doubter's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from ..data.benchmarks import BENCHMARKS, dataset_sources, load_benchmark, load_user_dataset
from ..data.collection import CollectConfig
from ..data.splits import assert_disjoint, check_no_overlap, split_by_question
from ..names import RUN_MANIFEST
from ..paths import read_json, write_json
from ..tuner.base_models import load_base_model
from ..tuner.config import DoubterConfig


DOUBTER_USER_FIELDS = DoubterConfig.user_fields()


READ_SIDE = ("target_layers", "pooling", "read_position")  # Doubter settings the activation cache is made for
RESUMABLE_COLLECT = ("batch_size",)  # collect settings a resumed collection may change (they change no result)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {RUN_MANIFEST}: run `peft-doubter collect --run-dir {run_dir}` first.")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "collect" not in manifest:
        raise ValueError(f"{path} is not a run manifest (no `collect` section): restore it or start a new run.")
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write run.json atomically."""
    write_json(Path(run_dir) / RUN_MANIFEST, manifest)


def injection_trained(manifest: dict[str, Any]) -> bool:
    """Whether a trained run's injection was trained (its two-pass text differs from the base's); a head-only run
    (`train_injection=False`) is used thresholded."""
    return manifest.get("train", {}).get("args", {}).get("train_injection", True) is not False


def collection_differences(previous: dict[str, Any], collect: dict[str, Any], prompt: dict[str, Any],
                           doubter: dict[str, Any]) -> list[str]:
    """The settings in which a new `collect` on a run directory differs from the collection it holds."""
    differences = [f"{section}.{key}: {old.get(key)!r} -> {new[key]!r}"
                   for section, old, new in (("collect", previous["collect"], collect),
                                             ("prompt", previous["prompt"], prompt))
                   for key in new if key not in RESUMABLE_COLLECT and old.get(key) != new[key]]
    differences += [f"doubter.{key}: {previous['doubter'].get(key)!r} -> {doubter[key]!r}" for key in READ_SIDE
                    if previous["doubter"].get(key, "prompt" if key == "read_position" else None) != doubter[key]]
    return differences


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


def _load_source(name: str, config: CollectConfig) -> datasets.Dataset:
    if name in BENCHMARKS:
        return load_benchmark(name, split=config.dataset_split)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"Unknown dataset {name!r}: not a benchmark ({', '.join(BENCHMARKS)}) and no such file.")
    if path.is_file() and not path.read_text(errors="replace").strip():
        raise ValueError(f"Dataset file {path} is empty.")
    return load_user_dataset(name, question_column=config.question_column, answer_column=config.answer_column,
                             choices_column=config.choices_column, label_column=config.label_column)


def load_questions(config: CollectConfig) -> datasets.Dataset:
    """Every question of the run's sources, each row with its `source`. Sources are all open-ended or all
    multiple-choice (a batch of the collection is answered one way)."""
    names = dataset_sources(config.dataset)
    parts = [_load_source(name, config) for name in names]
    multiple_choice = {name: any(len(choices) for choices in part["choices"]) for name, part in zip(names, parts)}
    if len(set(multiple_choice.values())) > 1:
        kinds = {mc: ", ".join(name for name in names if multiple_choice[name] == mc) for mc in (False, True)}
        raise ValueError(f"`dataset` {config.dataset!r} mixes open-ended sources ({kinds[False]}) and "
                         f"multiple-choice sources ({kinds[True]}): collect them in separate runs.")
    parts = [part.add_column("source", [name] * len(part)) for name, part in zip(names, parts)]
    return datasets.concatenate_datasets([part.cast(parts[0].features) for part in parts])


def source_summary(questions: datasets.Dataset, cache: datasets.Dataset) -> list[dict[str, Any]]:
    """Per source of a collected run: its questions per split and the base's accuracy on them (run.json's
    `data_sources`); `questions` in the order they were collected."""
    summary = {}
    for source, split, correct in zip(questions["source"], cache["split"], cache["correct"]):
        entry = summary.setdefault(source, {"dataset": source, "questions": {}, "right": {}})
        entry["questions"][split] = entry["questions"].get(split, 0) + 1
        entry["right"][split] = entry["right"].get(split, 0) + int(correct)
    return [{"dataset": entry["dataset"], "questions": entry["questions"],
             "base_accuracy": {split: entry["right"][split] / count for split, count in entry["questions"].items()}}
            for entry in summary.values()]


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


def build_doubter_config(values: dict[str, Any]) -> DoubterConfig:
    unknown = sorted(set(values) - set(DOUBTER_USER_FIELDS))
    if unknown:
        raise ValueError(f"Unknown Doubter settings {unknown}.")
    return DoubterConfig(**values)
