"""A tiny local base model (random Llama + word-level tokenizer) and QA files for end-to-end pipeline tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import tiny_models
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "Q:", "A:", "\n"] + [f"w{i}" for i in range(tiny_models.VOCAB - 7)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def save_tiny_model(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    model = tiny_models.build(family, seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_questions(path: Path, count: int = 60, seed: int = 0, answers: dict[str, str] | None = None) -> Path:
    """Open-QA JSONL rows `{"question", "answer"}`; `answers` overrides the gold answer of a question."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            question = " ".join(f"w{rng.randrange(10, 100)}" for _ in range(4))
            gold = (answers or {}).get(question, f"w{rng.randrange(100, 120)}")
            handle.write(json.dumps({"question": question, "answer": [gold]}) + "\n")
    return path


PROMPT_SETTINGS = {"style": "completion", "k_shot": 0}
DOUBTER_SETTINGS = {"target_layers": [1, 2, 3], "encoder_bottleneck_dim": 32, "ca_bottleneck_dim": 32,
                    **tiny_models.TWO_PASS}


def collect_settings(model_dir: Path, dataset: Path, **overrides) -> dict:
    return {"model": str(model_dir), "dataset": str(dataset), "limit": None, "max_new_tokens": 3, "batch_size": 16,
            "shard_size": 16, **overrides}


def make_workspace(root: Path) -> dict[str, Path]:
    """A tiny model and a collected run on a QA file where the model's own greedy answer is gold for about half of
    the questions."""
    from peft_doubter.data.collection import CollectConfig
    from peft_doubter.data.prompts import PromptConfig
    from peft_doubter.runs import stages

    model_dir = save_tiny_model(root / "model")
    probe = stages.collect_run(root / "probe", CollectConfig(**collect_settings(
        model_dir, write_questions(root / "raw.jsonl"))), PromptConfig(**PROMPT_SETTINGS), DOUBTER_SETTINGS)
    own = {row["question"]: row["pass1_answer"] for i, row in enumerate(probe) if i % 2 == 0 and row["pass1_answer"]}
    dataset = write_questions(root / "qa.jsonl", answers=own)
    run_dir = root / "run"
    stages.collect_run(run_dir, CollectConfig(**collect_settings(model_dir, dataset)), PromptConfig(**PROMPT_SETTINGS),
                       DOUBTER_SETTINGS)
    return {"root": root, "model": model_dir, "dataset": dataset, "run": run_dir}
