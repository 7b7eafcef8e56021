"""Where peft-doubter finds its data folders and keeps what it builds."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from .names import RUN_LOCK


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a half-written file is never left at `path` (a temporary file is renamed over it)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    partial.replace(path)


def read_json(path: Path) -> Any:
    """Read a JSON file, with an error that names it when it is damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged: not valid JSON ({error}). Restore it or start a new run "
                         "directory.") from None


def check_writable(directory: Path) -> None:
    """Fail before any work when results could not be written into `directory` (or the folder it would be made
    in)."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError
        with tempfile.TemporaryFile(dir=existing):  # a read-only file system refuses even root
            pass
    except OSError:
        raise PermissionError(f"{existing} is not writable: nothing was computed. Make it writable or choose "
                              "another run directory.") from None


@contextlib.contextmanager
def run_directory_lock(directory: Path) -> Iterator[None]:
    """Hold the run directory's lock for one stage; a second process on the same directory is refused at once
    (two writers would mix their results)."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / RUN_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"Another process is working on {directory} (it holds {directory / RUN_LOCK}); wait for "
                           "it to finish or use another run directory.") from None
    try:
        yield
    finally:
        lock.release()
