"""`peft-doubter collect | train | eval | ask | export | push | quickstart`, driven by a run directory.

Options come from the config dataclasses (`CollectConfig`, `PromptConfig`, `DoubterConfig`, `DoubterSFTConfig`,
`EvalConfig`): one `--field-name` per field, with the field's help; nothing is given a second default here. Only
options given on the command line override the dataclass defaults (or, for later stages, what `run.json` holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from .collect import CollectConfig
from .config import DoubterConfig
from .evaluation import EvalConfig
from .prompts import PromptConfig

_TRUE = {"true", "1", "yes", "y"}


def _parse_bool(text: str) -> bool:
    if text.lower() not in _TRUE | {"false", "0", "no", "n"}:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in _TRUE


def _parse_layers(text: str) -> Any:
    return text if text in ("all", "late") else [int(part) for part in text.split(",")]


def _parse_optional(convert):
    return lambda text: None if text.lower() == "none" else convert(text)


def _converter(name: str, annotation: Any):
    """An argparse `type` for a dataclass field annotation, or None when the field is not a CLI option."""
    if name in ("target_layers", "cross_attn_layers"):
        return _parse_layers
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        convert = _converter(name, inner[0]) if len(inner) == 1 else None
        return _parse_optional(convert) if convert else None
    if origin is typing.Literal:
        return str
    if annotation is bool:
        return _parse_bool
    if annotation in (int, float, str):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str
    return None


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, group: str,
                          only: Optional[Sequence[str]] = None, skip: Sequence[str] = ()) -> None:
    """One `--field-name` option per field of `cls` (defaults suppressed, so only given options are set)."""
    hints = typing.get_type_hints(cls)
    options = parser.add_argument_group(group)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or (only is not None and f.name not in only) or f.name.startswith("_"):
            continue
        convert = _converter(f.name, hints[f.name])
        if convert is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:
            continue
        options.add_argument(flag, dest=f"{group}.{f.name}", type=convert, default=argparse.SUPPRESS,
                             help=f.metadata.get("help", "").replace("%", "%%"))


def given(namespace: argparse.Namespace, group: str) -> dict[str, Any]:
    """The options of one group that were given on the command line."""
    prefix = group + "."
    return {key[len(prefix):]: value for key, value in vars(namespace).items() if key.startswith(prefix)}


DOUBTER_CLI_FIELDS = [name for name in DoubterConfig.user_fields() if name != "check_base_fingerprint"]


def _training_args(run_dir: Path, values: dict[str, Any]):
    from .trainer_config import DoubterSFTConfig

    return DoubterSFTConfig(output_dir=str(run_dir / "checkpoints"), **values)


def build_parser() -> argparse.ArgumentParser:
    from .trainer_config import DoubterSFTConfig

    parser = argparse.ArgumentParser(prog="peft-doubter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--run-dir", type=Path, required=True, help="The run directory (holds run.json).")
        return sub

    collect = command("collect", "Answer questions with the frozen base and cache pass-1 activations.")
    add_dataclass_options(collect, CollectConfig, "collect")
    add_dataclass_options(collect, PromptConfig, "prompt")
    add_dataclass_options(collect, DoubterConfig, "doubter", only=DOUBTER_CLI_FIELDS)

    train = command("train", "Train the Doubter on the cached train split (resumes from the last checkpoint).")
    add_dataclass_options(train, DoubterConfig, "doubter", only=DOUBTER_CLI_FIELDS)
    add_dataclass_options(train, DoubterSFTConfig, "train", skip=("output_dir",))

    evaluate = command("eval", "Evaluate the Doubter beside the baselines on held-out questions; print the table.")
    add_dataclass_options(evaluate, EvalConfig, "eval")

    ask = command("ask", "Ask the trained Doubter a question.")
    ask.add_argument("question", nargs="+", help="The question.")
    ask.add_argument("--max-new-tokens", type=int, default=32, help="Longest answer.")
    ask.add_argument("--threshold", help="Answer with the base's own answer only when the Doubter's confidence in it "
                     "is at least this ('calibrated': the threshold certified by `peft-doubter eval`). Default: "
                     "greedy two-pass text.")

    command("export", "Write the GGUF sidecar for llama.cpp (run_dir/doubter_sidecar.gguf).")

    push = command("push", "Upload adapter, sidecar, manifest, report and model card to the Hub in one commit.")
    push.add_argument("--repo-id", required=True, help="user/name on the Hub.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--base-model", help="Hub id of the base model (needed when the run used a local path).")
    push.add_argument("--license", help="Licence of the base model (needed for bases other than the embedded ones).")

    quick = command("quickstart", "collect -> train -> eval on the embedded defaults, then one answered and one "
                                  "declined question.")
    add_dataclass_options(quick, CollectConfig, "collect")
    add_dataclass_options(quick, PromptConfig, "prompt")
    add_dataclass_options(quick, DoubterConfig, "doubter", only=DOUBTER_CLI_FIELDS)
    add_dataclass_options(quick, DoubterSFTConfig, "train", skip=("output_dir",))
    add_dataclass_options(quick, EvalConfig, "eval")
    return parser


def _ask(run_dir: Path, question: str, max_new_tokens: int, threshold_text: Optional[str]) -> None:
    from .run import ask, calibrated_threshold

    threshold = None
    if threshold_text == "calibrated":
        threshold = calibrated_threshold(run_dir)
        if threshold == float("inf"):
            print("note: the calibrated threshold is infinite (no threshold met the target risk): every question "
                  "is declined.", file=sys.stderr)
    elif threshold_text is not None:
        try:
            threshold = float(threshold_text)
        except ValueError:
            raise ValueError(f"--threshold must be a number or 'calibrated', got {threshold_text!r}.") from None
    answer = ask(run_dir, question, max_new_tokens, threshold=threshold)
    confidence = "" if answer.confidence is None else f" (confidence {answer.confidence:.3f})"
    print(("[declined] " if answer.declined else "") + answer.text + confidence)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import run

    args = build_parser().parse_args(argv)
    run_dir: Path = args.run_dir
    try:
        if args.command in ("collect", "quickstart"):
            run.collect_run(run_dir, CollectConfig(**given(args, "collect")), PromptConfig(**given(args, "prompt")),
                            given(args, "doubter"))
        if args.command in ("train", "quickstart"):
            run.train_run(run_dir, _training_args(run_dir, given(args, "train")), given(args, "doubter"))
        if args.command in ("eval", "quickstart"):
            report = run.eval_run(run_dir, EvalConfig(**given(args, "eval")))
            print(report.to_markdown())
        if args.command == "quickstart":
            run.show_examples(run_dir)
        if args.command == "ask":
            _ask(run_dir, " ".join(args.question), args.max_new_tokens, args.threshold)
        if args.command == "export":
            from .export import export_run

            print(export_run(run_dir))
        if args.command == "push":
            from .hub import push_run

            print(push_run(run_dir, args.repo_id, private=args.private, base_model=args.base_model,
                           license=args.license))
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"peft-doubter {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
