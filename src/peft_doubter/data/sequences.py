"""Prompt + continuation sequences for pass 2: tokenized with prompt labels -100, batched with aligned prompt ends so
that only the continuation columns need LM-head logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..names import TOKEN_SIGNALS
from ..tuner.capture import Reading, choice_signals


def tokenize_example(tokenizer, prompt: str, target: str, chat: bool) -> dict[str, list[int]]:
    """`input_ids` = prompt + target (+ end marker), `labels` = -100 over the prompt. Completion prompts end the
    answer with a newline (the few-shot format), chat prompts with the end-of-sequence token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    target_ids = tokenizer(target if prompt[-1:].isspace() else f" {target}", add_special_tokens=False)["input_ids"]
    target_ids = target_ids + ([tokenizer.eos_token_id] if chat else tokenizer("\n", add_special_tokens=False)[
        "input_ids"][-1:])
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


def first_target_token(tokenizer, prompt: str, target: str, chat: bool) -> int:
    """The first token of `target` after `prompt`, as `tokenize_example` writes it (e.g. the refusal's first token,
    whose probability at the end of the prompt is the Doubter's decision confidence)."""
    row = tokenize_example(tokenizer, prompt, target, chat)
    return row["input_ids"][row["labels"].index(next(label for label in row["labels"] if label != -100))]


def align_prompts(rows: list[dict[str, list[int]]], pad: int, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Batch prompt+target rows with every prompt ending in the same column (prompts left-padded, targets
    right-padded), so the target positions of all rows share a few columns and only those need LM-head logits;
    the last prompt position of every row is column `prompt_width - 1`. `prefix` names a per-token field of the
    rows (e.g. cached hidden states, (S, H)) placed in the same layout, zeros elsewhere."""
    prompt_lengths = [sum(1 for label in row["labels"] if label == -100) for row in rows]
    prompt_width = max(prompt_lengths)
    width = prompt_width + max(len(r["input_ids"]) - p for r, p in zip(rows, prompt_lengths))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    placed = None
    for i, (row, length) in enumerate(zip(rows, prompt_lengths)):
        start = prompt_width - length
        end = start + len(row["input_ids"])
        input_ids[i, start:end] = torch.as_tensor(row["input_ids"])
        labels[i, start:end] = torch.as_tensor(row["labels"])
        attention_mask[i, start:end] = 1
        if prefix is not None:
            states = torch.as_tensor(np.asarray(row[prefix], dtype=np.float32))
            if placed is None:
                placed = states.new_zeros((len(rows), width, states.shape[-1]))
            placed[i, start:end] = states
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if placed is not None:
        batch["prefix_hidden"] = placed
    return batch


def target_columns(labels: torch.Tensor) -> torch.Tensor:
    """Columns whose next token is supervised in some row: the only positions that need LM-head logits."""
    supervised = (labels[:, 1:] != -100).any(0)
    return supervised.nonzero().squeeze(-1)


def cached_reading(rows: Sequence[dict[str, Any]], features_key: str = "features", answer: bool = True) -> Reading:
    """Pass 1's cached reading of a batch of rows: their features (`features_key`) and, with `answer` and when the
    rows hold them, the answer tokens' states and signals, zero-padded to the longest answer, and the option
    distribution's signals of multiple-choice rows (from `option_logprobs`)."""
    features = torch.stack([torch.as_tensor(row[features_key]) for row in rows]).float()
    if not answer or "answer_states" not in rows[0]:
        return Reading(features)
    states = [torch.as_tensor(np.asarray(row["answer_states"], dtype=np.float32)) for row in rows]
    signals = [torch.as_tensor(np.asarray(row["token_signals"], dtype=np.float32)) for row in rows]
    longest = max(1, max(len(s) for s in states))
    layers, hidden = features.shape[1], states[0].shape[-1] if states[0].numel() else features.shape[-1]
    answer_states = torch.zeros((len(rows), longest, layers, hidden))
    token_signals = torch.zeros((len(rows), longest, len(TOKEN_SIGNALS)))
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for index, (state, signal) in enumerate(zip(states, signals)):
        answer_states[index, : len(state)] = state.reshape(len(state), layers, hidden)  # an empty answer reads none
        token_signals[index, : len(signal)] = signal.reshape(len(signal), len(TOKEN_SIGNALS))
        mask[index, : len(state)] = True
    options = [row.get("option_logprobs", ()) for row in rows]
    choices = choice_signals(options) if any(len(scores) for scores in options) else None
    return Reading(features, answer_states, mask, token_signals, choices)
