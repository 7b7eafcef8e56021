"""The Doubter on the Hugging Face Hub: model cards with the measured metrics, one-commit pushes, checked loading."""

from ..deploy.sidecar import download_sidecar
from .card import BaseModelInfo, base_model_info, doubter_card
from .repo import check_doubter_repo, load_doubter, push_run, push_to_hub, run_card


__all__ = [
    "BaseModelInfo",
    "base_model_info",
    "check_doubter_repo",
    "doubter_card",
    "download_sidecar",
    "load_doubter",
    "push_run",
    "push_to_hub",
    "run_card",
]
