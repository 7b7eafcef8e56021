"""`peft-doubter collect | train | eval | ask | export | push | quickstart`, driven by a run directory.

Options come from the config dataclasses (`CollectConfig`, `PromptConfig`, `DoubterConfig`, `DoubterSFTConfig`,
`EvalConfig`): one `--field-name` per field, with the field's help; nothing is given a second default here. Only
options given on the command line override the dataclass defaults (or, for later stages, what `run.json` holds).
A command's options are built only when that command runs, so `peft-doubter --help` needs no training extras.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from ..names import AGENT_MODES, AGENT_SCORERS, CORPORA, SERVE_BACKENDS
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
                        "Default: 'calibrated' for a run whose injection was not trained (the default head-only "
                        "Doubter), else greedy two-pass text.")


def _push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", required=True, help="user/name on the Hub.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--base-model", help="Hub id of the base model (needed when the run used a local path).")
    parser.add_argument("--license", help="Licence of the base model (needed for bases other than the embedded ones).")


def _gate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", help=f"Lookup corpus: one of {CORPORA} or a JSONL file of passages "
                        "({\"id\", \"title\", \"text\"}); without one the agent answers or declines.")
    parser.add_argument("--scorer", default="doubter", choices=AGENT_SCORERS, help="The gate's confidence.")
    parser.add_argument("--threshold", default="calibrated", help="Answer closed-book at this confidence or "
                        "above ('calibrated': the value `agent eval` (or `eval`) certified).")
    parser.add_argument("--lookup-threshold", default="calibrated", help="Answer after a lookup at this "
                        "confidence or above, else decline ('calibrated': certified by `agent eval`).")
    parser.add_argument("--mode", default="confidence", choices=AGENT_MODES, help="Gate on the scorer's "
                        "confidence, or (text) on whether pass 2 wrote the refusal, as in the seeds.")


def _agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("run", "eval"), help="run: answer a question; eval: compare every gate.")
    parser.add_argument("question", nargs="*", help="The question (agent run).")
    _gate_options(parser)
    parser.add_argument("--questions-from", help="(eval) Another run directory whose val and test questions to use.")
    parser.add_argument("--max-questions", type=int, help="(eval) Use only the first N questions.")
    parser.add_argument("--verify", type=int, default=20, help="(eval) Live agent runs that must reproduce the "
                        "simulated actions.")
    parser.add_argument("--target-risk", type=float, help="(eval) Risk target of the calibrated policy.")
    parser.add_argument("--no-text-mode", action="store_true", help="(eval) Skip the pass-2 text (text mode; skipped anyway for a run whose injection was not trained).")
    parser.add_argument("--json", action="store_true", help="(run) Print the whole result as JSON.")


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: loopback only).")
    parser.add_argument("--port", type=int, default=8000, help="Port.")
    parser.add_argument("--corpus", help=f"Lookup corpus for `doubter.mode: agent`: one of {CORPORA} or a JSONL file.")
    parser.add_argument("--model-id", help="The model name clients use (default: doubter-<run directory name>).")
    parser.add_argument("--backend", choices=SERVE_BACKENDS, default="pytorch",
                        help="pytorch, or llama.cpp (the exported sidecar on the base's GGUF; no PyTorch compute).")
    parser.add_argument("--gguf", type=Path, help="llama.cpp: the base's GGUF (default: the embedded model's).")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp: CPU threads.")


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
    "agent": (("The agent: answer, look up, or decline by the Doubter's confidence (run), or compare every gate "
               "on held-out questions (eval)."), _agent_options),
    "chat": ("A multi-turn chat with the agent.", _gate_options),
    "serve": ("An OpenAI-compatible server answering with the Doubter's confidence.", _serve_options),
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
    trainer = None
    if args.command in ("train", "quickstart"):
        from ..runs.stages import train_run

        trainer = train_run(run_dir, values("train"), values("doubter"))
    if args.command in ("eval", "quickstart"):
        from ..evaluation.protocol import EvalConfig
        from ..runs.stages import eval_run

        config = EvalConfig(**values("eval"))
        # quickstart evaluates the adapter it just trained and saved, without loading it again
        model, tokenizer = (trainer.model.eval(), trainer.processing_class) if trainer is not None else (None, None)
        print(eval_run(run_dir, config, model, tokenizer).to_markdown())
        if args.command == "quickstart":
            from ..runs.ask import show_examples

            show_examples(run_dir, config.output_name)
    if args.command == "ask":
        from ..runs.ask import ask
        from ..runs.manifest import injection_trained, read_manifest

        threshold = args.threshold
        if threshold is None and not injection_trained(read_manifest(run_dir)):
            threshold = "calibrated"  # a head-only Doubter's two-pass text is the base's own answer
        answer = ask(run_dir, " ".join(args.question), args.max_new_tokens, threshold=_threshold(run_dir, threshold))
        confidence = "" if answer.confidence is None else f" (confidence {answer.confidence:.3f})"
        print(("[declined] " if answer.declined else "") + answer.text + confidence)
    if args.command == "agent" and args.action == "run":
        from ..runs.agents import build_agent

        if not " ".join(args.question).strip():
            raise ValueError("agent run needs a question.")
        agent, _ = build_agent(run_dir, args.corpus, args.scorer, args.threshold, args.lookup_threshold, args.mode)
        result = agent.run(" ".join(args.question))
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            print(("[declined] " if result.action == "decline" else "") + result.text)
            print(f"action {result.action}, confidence {result.confidence:.3f} (threshold {result.threshold:.3f}, "
                  f"scorer {result.scorer})")
            for step in result.steps:
                print(f"  - {step}")
    if args.command == "agent" and args.action == "eval":
        from ..runs.agents import agent_eval

        if not args.corpus:
            raise ValueError("agent eval needs --corpus (the lookup tool's passages).")
        result = agent_eval(run_dir, args.corpus, args.questions_from, max_questions=args.max_questions,
                            verify=args.verify, target_risk=args.target_risk, text_mode=False if args.no_text_mode else None)
        print(json.dumps({k: result[k] for k in ("n", "closed_book_accuracy", "open_book_accuracy",
                                                  "answer_recall_top_k")}, indent=2))
    if args.command == "chat":
        from ..agent.chat import ChatLoop, Session
        from ..runs.agents import build_agent

        agent, _ = build_agent(run_dir, args.corpus, args.scorer, args.threshold, args.lookup_threshold, args.mode)
        ChatLoop(Session(agent)).run()
    if args.command == "serve":
        from ..serving import serve

        serve(run_dir, args.host, args.port, args.corpus, args.model_id, args.backend, args.gguf, args.threads)
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
