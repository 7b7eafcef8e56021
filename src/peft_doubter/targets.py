"""Training targets from the pass-1 oracle: confirm when the base was right, otherwise refuse (or correct)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import datasets
import torch

from .config import DoubterConfig
from .prompts import LETTERS
from .scoring import CORRECTION_PREFIX

Action = Literal["confirm", "refuse", "correct"]


def gold_answer(row: dict[str, Any], mc_format: str) -> str:
    """The correct answer as the model should say it: for open QA the model's own wording when it was judged right
    (it matches a gold alias), otherwise the first gold answer; for multiple choice the option (or its letter)."""
    if row["choices"]:
        return LETTERS[row["label"]] if mc_format == "letter" else row["choices"][row["label"]]
    return row["pass1_answer"] if row["correct"] else row["answers"][0]


def _unit(text: str, seed: int) -> float:
    """A deterministic number in [0, 1) per question, so targets do not change between runs or resumption."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_target(row: dict[str, Any], config: DoubterConfig, mc_format: str, seed: int = 0) -> tuple[str, Action]:
    """(target text without the leading space, action) for one cached question."""
    answer = gold_answer(row, mc_format)
    if row["correct"]:
        return answer, "confirm"
    if config.enable_self_correction and _unit(row["id"], seed) < config.correction_ratio:
        return f"{CORRECTION_PREFIX} {answer}.", "correct"
    return config.refusal_text, "refuse"


def tokenize_example(tokenizer, prompt: str, target: str, chat: bool) -> dict[str, list[int]]:
    """`input_ids` = prompt + target (+ end marker), `labels` = -100 over the prompt. Completion prompts end the
    answer with a newline (the few-shot format), chat prompts with the end-of-sequence token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    target_ids = tokenizer(target if prompt[-1:].isspace() else f" {target}", add_special_tokens=False)["input_ids"]
    target_ids = target_ids + ([tokenizer.eos_token_id] if chat else tokenizer("\n", add_special_tokens=False)[
        "input_ids"][-1:])
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


def align_prompts(rows: list[dict[str, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Batch prompt+target rows with every prompt ending in the same column (prompts left-padded, targets
    right-padded), so the target positions of all rows share a few columns and only those need LM-head logits."""
    prompt_lengths = [sum(1 for label in row["labels"] if label == -100) for row in rows]
    prompt_width = max(prompt_lengths)
    width = prompt_width + max(len(r["input_ids"]) - p for r, p in zip(rows, prompt_lengths))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, length) in enumerate(zip(rows, prompt_lengths)):
        start = prompt_width - length
        end = start + len(row["input_ids"])
        input_ids[i, start:end] = torch.as_tensor(row["input_ids"])
        labels[i, start:end] = torch.as_tensor(row["labels"])
        attention_mask[i, start:end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_columns(labels: torch.Tensor) -> torch.Tensor:
    """Columns whose next token is supervised in some row: the only positions that need LM-head logits."""
    supervised = (labels[:, 1:] != -100).any(0)
    return supervised.nonzero().squeeze(-1)


def build_training_set(cache: datasets.Dataset, tokenizer, config: DoubterConfig, mc_format: str, chat: bool,
                       seed: int = 0) -> datasets.Dataset:
    """Tokenized two-pass training rows (with the cached pass-1 features) for every cached question."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        target, action = choose_target(row, config, mc_format, seed)
        return {**tokenize_example(tokenizer, row["prompt"], target, chat), "action": action,
                "pass1_features": row["features"]}

    keep = ["input_ids", "labels", "pass1_features", "action", "id", "correct"]
    converted = cache.map(convert, desc="Building targets")
    return converted.remove_columns([c for c in converted.column_names if c not in keep])
