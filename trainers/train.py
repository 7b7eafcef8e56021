"""Collect, train and evaluate a Doubter from a YAML recipe (or command-line options), TRL-script style.

    python trainers/train.py --config trainers/recipes/gemma-3-270m-triviaqa.yaml
    python trainers/train.py --config trainers/recipes/gemma-3-270m-triviaqa.yaml --num_train_epochs 1
    accelerate launch --multi_gpu --num_processes 2 trainers/train.py --config recipe.yaml --stages train --use_cpu true

Every option is a field of `CollectConfig`, `PromptConfig`, `DoubterConfig`, `DoubterSFTConfig` or `EvalConfig`
(parsed by `HfArgumentParser`); a recipe sets any of them, options given on the command line win. On CPUs,
`accelerate launch --cpu` starts one process only: use the torchrun launcher (`--multi_gpu`) with `--use_cpu true`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from transformers import HfArgumentParser

from peft_doubter import run
from peft_doubter.cli import DOUBTER_CLI_FIELDS
from peft_doubter.collect import CollectConfig
from peft_doubter.config import DoubterConfig
from peft_doubter.evaluation import EvalConfig
from peft_doubter.prompts import PromptConfig
from peft_doubter.trainer_config import DoubterSFTConfig

STAGES = ("collect", "train", "eval")


@dataclass
class ScriptArguments:
    run_dir: str = field(metadata={"help": "Run directory (run.json, cache, checkpoints, adapter, eval)."})
    stages: str = field(default="collect,train,eval", metadata={"help": "Comma-separated stages to run."})
    config: Optional[str] = field(default=None, metadata={"help": "YAML recipe with any of the options."})


def _doubter_arguments() -> type:
    """A parser-friendly mirror of `DoubterConfig`'s user fields (same names, defaults and help; layer specs as
    text such as 'late' or '12,13,14')."""
    fields = []
    for f in dataclasses.fields(DoubterConfig):
        if f.name not in DOUBTER_CLI_FIELDS:
            continue
        kind = f.type if f.type in ("int", "float", "bool", "str") else "Optional[str]"
        default = ",".join(map(str, f.default)) if isinstance(f.default, list) else f.default
        if kind == "Optional[str]" and default is not None:
            default = str(default)
        fields.append((f.name, eval(kind), field(default=default, metadata=f.metadata)))  # noqa: S307
    return dataclasses.make_dataclass("DoubterArguments", fields)


DoubterArguments = _doubter_arguments()


def doubter_values(arguments) -> dict:
    values = dataclasses.asdict(arguments)
    for name in ("target_layers", "cross_attn_layers"):
        text = values[name]
        if text is not None and text not in ("all", "late"):
            values[name] = [int(part) for part in str(text).split(",")]
    if values["num_cognitive_tokens"] is not None:
        values["num_cognitive_tokens"] = int(values["num_cognitive_tokens"])
    return values


def parse(argv: list[str]):
    parser = HfArgumentParser((ScriptArguments, CollectConfig, PromptConfig, DoubterArguments, DoubterSFTConfig,
                               EvalConfig))
    script, *_ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    if script.config is None:
        return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    recipe = yaml.safe_load(Path(script.config).read_text()) or {}
    recipe.setdefault("run_dir", script.run_dir)
    recipe.setdefault("output_dir", str(Path(script.run_dir) / "checkpoints"))
    from_recipe = [f"--{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
                   for key, value in recipe.items()]
    return parser.parse_args_into_dataclasses(from_recipe + argv, look_for_args_file=False)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--output_dir" not in " ".join(argv):
        argv = argv + ["--output_dir", "unused"]  # train_run puts checkpoints under the run directory
    script, collect, prompt, doubter, training, evaluation = parse(argv)
    stages = [s.strip() for s in script.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"Unknown stages {unknown}; choose from {STAGES}.")
    run_dir = Path(script.run_dir)
    if "collect" in stages:
        run.collect_run(run_dir, collect, prompt, doubter_values(doubter))
    if "train" in stages:
        run.train_run(run_dir, training, doubter_values(doubter))
    if "eval" in stages and training.process_index == 0:
        print(run.eval_run(run_dir, evaluation).to_markdown())


if __name__ == "__main__":
    main()
