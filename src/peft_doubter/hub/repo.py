"""The Doubter on the Hugging Face Hub: one-commit pushes and checked loading.

`push_run` uploads a finished run (adapter, GGUF sidecar, manifest, evaluation and a model card) in one commit;
`push_to_hub` does the same for an in-memory model (adapter and card). `load_doubter` and `check_doubter_repo` read
`adapter_config.json` first, so a repo holding another adapter type fails with a clear error. Needs the `hub` extra
(huggingface_hub, jinja2).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from ..data.collection import cache_is_multiple_choice
from ..deploy.sidecar import not_exportable
from ..evaluation.report import EvaluationReport
from ..names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_MANIFEST, SIDECAR_FILE
from ..paths import fetch_file
from ..tuner.config import DoubterConfig
from ..tuner.loading import check_adapter_weights, read_adapter_config
from ..tuner.registry import DOUBTER_PEFT_TYPE
from .card import EVAL_FILES, RUN_FILES, BaseModelInfo, base_model_info, doubter_card


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _adapter_params(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


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
        return (self.path / SIDECAR_FILE).is_file()


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
    cache = run_dir / manifest["cache"] if "cache" in manifest else None
    multiple_choice = cache is not None and cache.is_dir() and cache_is_multiple_choice(cache)
    if not_exportable(config, multiple_choice) is None and not (run_dir / SIDECAR_FILE).is_file():
        raise FileNotFoundError(
            f"No GGUF sidecar at {run_dir / SIDECAR_FILE}: run `peft-doubter export --run-dir {run_dir}` first."
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
        files={name: text for name, text in RUN_FILES.items() if name != SIDECAR_FILE or run.has_sidecar},
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
        **{name: run.path / name for name in (SIDECAR_FILE, RUN_MANIFEST, *EVAL_FILES)
           if name != SIDECAR_FILE or run.has_sidecar},
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
        raise TypeError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a Doubter.")
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


def check_doubter_repo(
    repo_id_or_path: Union[str, os.PathLike], revision: Optional[str] = None, *, token: Optional[str] = None
) -> DoubterConfig:
    """The `DoubterConfig` of a Hub repo or local adapter directory; a clear error when it holds another PEFT
    adapter type or no adapter at all."""
    try:
        path = fetch_file(repo_id_or_path, ADAPTER_CONFIG, revision, token)
    except (FileNotFoundError, EntryNotFoundError) as error:
        raise FileNotFoundError(
            f"{repo_id_or_path} has no {ADAPTER_CONFIG}: it is not a PEFT adapter, so not a Doubter."
        ) from error
    try:
        peft_type = _read_json(path).get("peft_type")
    except (ValueError, AttributeError):  # not JSON, or not an object: `read_adapter_config` says which
        peft_type = DOUBTER_PEFT_TYPE.value
    if peft_type != DOUBTER_PEFT_TYPE.value:
        raise ValueError(
            f"{repo_id_or_path} is a {peft_type} adapter, not a Doubter ({ADAPTER_CONFIG} has peft_type "
            f"{peft_type!r}, expected {DOUBTER_PEFT_TYPE.value!r}); load it with `PeftModel.from_pretrained`."
        )
    return read_adapter_config(path)


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
    try:
        weights = fetch_file(repo_id_or_path, ADAPTER_WEIGHTS, revision, token)
    except EntryNotFoundError:
        raise FileNotFoundError(f"{repo_id_or_path} has no {ADAPTER_WEIGHTS}: the adapter's weights are missing "
                                "(safetensors only; pickled weights are never loaded).") from None
    check_adapter_weights(weights)
    return PeftModel.from_pretrained(
        base_model, str(repo_id_or_path), adapter_name=adapter_name, is_trainable=is_trainable, config=config,
        revision=revision, token=token,
    )
