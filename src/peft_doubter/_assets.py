"""Data folders that live at the root of a source checkout and inside the package of an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """`hub_cards` or `llama_cpp_patch`: inside the installed package (a wheel ships them there), else at the root of
    the source checkout (editable installs). Users of the path report a missing folder."""
    inside = _PACKAGE / name
    return inside if inside.is_dir() or not (_PACKAGE.parents[1] / name).is_dir() else _PACKAGE.parents[1] / name
