"""Where peft-doubter finds its data folders and keeps what it builds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


_PACKAGE = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """`hub_cards` or `llama_cpp_patch`: inside the installed package (a wheel ships them there), else at the root of
    the source checkout (editable installs). Users of the path report a missing folder."""
    inside = _PACKAGE / name
    return inside if inside.is_dir() or not (_PACKAGE.parents[1] / name).is_dir() else _PACKAGE.parents[1] / name


def cache_dir() -> Path:
    """Where converted models and llama.cpp builds are kept (`PEFT_DOUBTER_CACHE`, default ~/.cache/peft-doubter)."""
    return Path(os.environ.get("PEFT_DOUBTER_CACHE", Path.home() / ".cache" / "peft-doubter"))


def fetch_file(repo_id_or_path: Union[str, os.PathLike], filename: str, revision: Optional[str] = None,
               token: Optional[str] = None) -> Path:
    """`filename` from a local directory, or from a Hub repo (downloaded into the Hub cache by `huggingface_hub`)."""
    local = Path(repo_id_or_path)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {filename}.")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(repo_id_or_path), filename, revision=revision, token=token))
