"""Prompt + continuation sequences for pass 2: tokenized with prompt labels -100, batched with aligned prompt ends so
that only the continuation columns need LM-head logits."""

from __future__ import annotations

import torch


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
