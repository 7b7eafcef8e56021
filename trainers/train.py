"""Collect, train and evaluate a Doubter from a YAML recipe (or command-line options), TRL-script style.

    python trainers/train.py --config trainers/recipes/gemma-3-270m-triviaqa.yaml
    python trainers/train.py --config trainers/recipes/gemma-3-270m-triviaqa.yaml --num_train_epochs 1
    accelerate launch --multi_gpu --num_processes 2 trainers/train.py --config recipe.yaml --stages train --use_cpu true

Every option is a field of `CollectConfig`, `PromptConfig`, `DoubterConfig`, `DoubterSFTConfig` or `EvalConfig`,
derived by the same code as the `peft-doubter` command line (`peft_doubter.cli.options`); a recipe sets any of them,
options given on the command line win. On CPUs, `accelerate launch --cpu` starts one process only: use the torchrun
launcher (`--multi_gpu`) with `--use_cpu true`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from peft_doubter.cli.main import _collect_options, _eval_options, _train_options
from peft_doubter.cli.options import apply_recipe, given
from peft_doubter.data.collection import CollectConfig
from peft_doubter.data.prompts import PromptConfig
from peft_doubter.evaluation.protocol import EvalConfig
from peft_doubter.runs.stages import collect_run, eval_run, train_run, training_arguments


STAGES = ("collect", "train", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", "--run_dir", required=True, type=Path,
                        help="Run directory (run.json, cache, checkpoints, adapter, eval).")
    parser.add_argument("--stages", default=",".join(STAGES), help="Comma-separated stages to run.")
    parser.add_argument("--config", type=Path, help="YAML recipe with any of the options.")
    _collect_options(parser)
    _train_options(parser)
    _eval_options(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        apply_recipe(parser, known.config)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"Unknown stages {unknown}; choose from {STAGES}.")
    doubter = given(args, "doubter", parser)
    if "collect" in stages:
        collect_run(args.run_dir, CollectConfig(**given(args, "collect", parser)),
                    PromptConfig(**given(args, "prompt", parser)), doubter)
    if "train" in stages:
        train_run(args.run_dir, given(args, "train", parser), doubter)
    if "eval" in stages and training_arguments(args.run_dir, given(args, "train", parser)).process_index == 0:
        print(eval_run(args.run_dir, EvalConfig(**given(args, "eval", parser))).to_markdown())


if __name__ == "__main__":
    main()
