"""Command-line options derived from the config dataclasses, shared by `peft-doubter` and `trainers/train.py`.

Each dataclass field becomes one option, spelled `--field-name` and `--field_name` (TRL scripts use the second), with
the field's help; nothing is given a second default here. Options are grouped (`collect`, `prompt`, `doubter`,
`train`, `eval`); `given` returns only those set on the command line, so the dataclass defaults (or, for later
stages, what run.json holds) apply to the rest. A recipe (`--config recipe.yaml`) sets values before the command
line does.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from ..names import LAYER_SPEC_WORDS


_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}
LAYER_FIELDS = ("target_layers", "cross_attn_layers")
# Fields that are bookkeeping, not user options: set by the adapter or by the stage itself.
SKIPPED = {"doubter": ("check_base_fingerprint",), "train": ("output_dir",)}


def parse_bool(text: str) -> bool:
    if text.lower() not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in _TRUE


def parse_layers(text: str) -> Any:
    if text in LAYER_SPEC_WORDS:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices or one of {LAYER_SPEC_WORDS}, got {text!r}") from None


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.lower() == "none" else convert(text)


def converter(name: str, annotation: Any) -> Optional[Callable[[str], Any]]:
    """An argparse `type` for a dataclass field annotation, or None when the field is not a command-line option."""
    if name in LAYER_FIELDS:
        return parse_layers
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X], or e.g. `OptimizerNames | str` (a name)
        inner = [a for a in args if a is not type(None)]
        convert = str if str in inner else converter(name, inner[0]) if len(inner) == 1 else None
        return _optional(convert) if convert and type(None) in args else convert
    if origin is typing.Literal:
        return str
    if annotation is bool:
        return parse_bool
    if annotation in (int, float, str):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str
    return None


def option_fields(cls: type, group: str, only: Optional[Sequence[str]] = None) -> dict[str, Callable[[str], Any]]:
    """{field name: converter} of the fields of `cls` that are options of `group`."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in SKIPPED.get(group, ()):
            continue
        if only is not None and f.name not in only:
            continue
        convert = converter(f.name, hints[f.name])
        if convert is not None:
            fields[f.name] = convert
    return fields


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, group: str,
                          only: Optional[Sequence[str]] = None) -> None:
    """One option per field of `cls` (defaults suppressed, so only given options are set). A field name that an
    earlier group already added sets both groups."""
    options = parser.add_argument_group(group)
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    for name, convert in option_fields(cls, group, only).items():
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        existing = parser._option_string_actions.get(flags[0])
        if existing is not None:
            existing.dest_groups.append(group)
            continue
        action = options.add_argument(*flags, dest=f"{group}.{name}", type=convert, default=argparse.SUPPRESS,
                                      help=help_of[name].replace("%", "%%"))
        action.dest_groups = [group]


def given(namespace: argparse.Namespace, group: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options of `group` that were set (on the command line or by a recipe)."""
    values = {}
    for action in parser._actions:
        if group in getattr(action, "dest_groups", ()) and hasattr(namespace, action.dest):
            values[action.dest.split(".", 1)[1]] = getattr(namespace, action.dest)
    return values


def apply_recipe(parser: argparse.ArgumentParser, path: Path) -> None:
    """Set the values of a YAML recipe as the parser's defaults (the command line still wins). Keys are field names;
    an unknown key is an error that names it."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipe, dict):
        raise TypeError(f"Recipe {path} must be a mapping of option names to values.")
    by_name = {action.dest.split(".", 1)[1]: action for action in parser._actions if "." in action.dest}
    unknown = sorted(set(recipe) - set(by_name))
    if unknown:
        raise ValueError(f"Recipe {path} has unknown options {unknown}.")
    defaults = {}
    for key, value in recipe.items():
        action = by_name[key]
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        defaults[action.dest] = action.type(text) if action.type else value
    parser.set_defaults(**defaults)
