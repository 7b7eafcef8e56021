"""`peft-doubter collect | train | eval | ask | export | push | quickstart`, driven by a run directory.

Options come from the config dataclasses (`CollectConfig`, `PromptConfig`, `DoubterConfig`, `DoubterSFTConfig`,
`EvalConfig`): one `--field-name` per field, with the field's help; nothing is given a second default here. Only
options given on the command line override the dataclass defaults (or, for later stages, what `run.json` holds).
A command's options are built only when that command runs, so `peft-doubter --help` needs no training extras.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from .options import add_dataclass_options, given


def _collect_options(parser: argparse.ArgumentParser) -> None:
    from ..data.collection import CollectConfig
    from ..data.prompts import PromptConfig
    from ..tuner.config import DoubterConfig

    add_dataclass_options(parser, CollectConfig, "collect")
    add_dataclass_options(parser, PromptConfig, "prompt")
    add_dataclass_options(parser, DoubterConfig, "doubter", only=DoubterConfig.user_fields())


def _train_options(parser: argparse.ArgumentParser) -> None:
    from ..training.config import DoubterSFTConfig
    from ..tuner.config import DoubterConfig

    add_dataclass_options(parser, DoubterConfig, "doubter", only=DoubterConfig.user_fields())
    add_dataclass_options(parser, DoubterSFTConfig, "train")


def _eval_options(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.protocol import EvalConfig

    add_dataclass_options(parser, EvalConfig, "eval")


def _ask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="+", help="The question.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest answer.")
    parser.add_argument("--threshold", help="Answer with the base's own answer only when the Doubter's confidence in "
                        "it is at least this ('calibrated': the threshold certified by `peft-doubter eval`). "
                        "Default: greedy two-pass text.")


def _push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", required=True, help="user/name on the Hub.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--base-model", help="Hub id of the base model (needed when the run used a local path).")
    parser.add_argument("--license", help="Licence of the base model (needed for bases other than the embedded ones).")


def _quickstart_options(parser: argparse.ArgumentParser) -> None:
    _collect_options(parser)
    _train_options(parser)
    _eval_options(parser)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "collect": ("Answer questions with the frozen base and cache pass-1 activations.", _collect_options),
    "train": ("Train the Doubter on the cached train split (resumes from the last checkpoint).", _train_options),
    "eval": ("Evaluate the Doubter beside the baselines on held-out questions; print the table.", _eval_options),
    "ask": ("Ask the trained Doubter a question.", _ask_options),
    "export": ("Write the GGUF sidecar for llama.cpp (run_dir/doubter_sidecar.gguf).", lambda parser: None),
    "push": ("Upload adapter, sidecar, manifest, report and model card to the Hub in one commit.", _push_options),
    "quickstart": ("collect -> train -> eval on the embedded defaults, then answered and declined examples.",
                   _quickstart_options),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are built (its config classes imported)."""
    parser = argparse.ArgumentParser(prog="peft-doubter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--run-dir", type=Path, required=True, help="The run directory (holds run.json).")
        if name == command:
            add_options(sub)
    return parser


def _threshold(run_dir: Path, text: Optional[str]) -> Optional[float]:
    from ..runs.ask import calibrated_threshold

    if text is None:
        return None
    if text == "calibrated":
        threshold = calibrated_threshold(run_dir)
        if threshold == float("inf"):
            print("note: the calibrated threshold is infinite (no threshold met the target risk): every question "
                  "is declined.", file=sys.stderr)
        return threshold
    try:
        threshold = float(text)
    except ValueError:
        raise ValueError(f"--threshold must be a number or 'calibrated', got {text!r}.") from None
    if not 0.0 <= threshold <= 1.0:  # also refuses nan
        raise ValueError(f"--threshold is a confidence in [0, 1], got {text!r}.")
    return threshold


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    run_dir: Path = args.run_dir
    values: Callable[[str], dict[str, Any]] = lambda group: given(args, group, parser)  # noqa: E731
    if args.command in ("collect", "quickstart"):
        from ..data.collection import CollectConfig
        from ..data.prompts import PromptConfig
        from ..runs.stages import collect_run

        collect_run(run_dir, CollectConfig(**values("collect")), PromptConfig(**values("prompt")), values("doubter"))
    if args.command in ("train", "quickstart"):
        from ..runs.stages import train_run

        train_run(run_dir, values("train"), values("doubter"))
    if args.command in ("eval", "quickstart"):
        from ..evaluation.protocol import EvalConfig
        from ..runs.stages import eval_run

        config = EvalConfig(**values("eval"))
        print(eval_run(run_dir, config).to_markdown())
        if args.command == "quickstart":
            from ..runs.ask import show_examples

            show_examples(run_dir, config.output_name)
    if args.command == "ask":
        from ..runs.ask import ask

        answer = ask(run_dir, " ".join(args.question), args.max_new_tokens,
                     threshold=_threshold(run_dir, args.threshold))
        confidence = "" if answer.confidence is None else f" (confidence {answer.confidence:.3f})"
        print(("[declined] " if answer.declined else "") + answer.text + confidence)
    if args.command == "export":
        from ..runs.stages import export_run

        print(export_run(run_dir))
    if args.command == "push":
        from ..hub.repo import push_run

        print(push_run(run_dir, args.repo_id, private=args.private, base_model=args.base_model, license=args.license))


def main(argv: Optional[Sequence[str]] = None) -> int:
    # PEFT asks every model `is_gradient_checkpointing`, which transformers 5.x deprecates: not the user's doing.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        _run(args, parser._subparsers._group_actions[0].choices[args.command])
    except (ValueError, FileNotFoundError, TypeError, PermissionError, RuntimeError) as error:
        print(f"peft-doubter {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
