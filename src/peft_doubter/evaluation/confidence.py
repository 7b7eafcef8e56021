"""Honest evaluation of a trained Doubter on held-out questions, beside baselines on exactly the same questions.

The Doubter's continuous confidence is `P(answer) / (P(answer) + P(refusal))` under pass 2: the teacher-forced
probabilities of the base's own pass-1 answer and of the canonical refusal, given the cognitive tokens. It ranks
questions, so it has a full risk–coverage curve. Its text behaviour (greedy two-pass generation) is reported
separately: declined, answered (same or different answer than pass 1) or corrected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.collection import stop_token_ids
from ..data.prompts import LETTERS, first_line
from ..data.scoring import extract_correction, extract_letter, is_correction, is_refusal, normalize_answer
from ..data.sequences import align_prompts, target_columns, tokenize_example
from .baselines import PassOneFeatures


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                          features: torch.Tensor, chat: bool) -> torch.Tensor:
    """Summed log-probability of each continuation after its prompt under pass 2 (pass 1 from `features`).
    LM-head logits are computed only for the continuation columns."""
    rows = [tokenize_example(tokenizer, p, c, chat) for p, c in zip(prompts, continuations)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = align_prompts(rows, pad)
    device = model.device
    columns = target_columns(batch["labels"]).to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   pass1_features=features.to(device), logits_to_keep=columns).logits.float()  # (B, K, V)
    targets = batch["labels"][:, columns.cpu() + 1].to(device)  # (B, K)
    logprobs = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return (logprobs * (targets != -100)).sum(-1).cpu()


def doubter_confidence(model, tokenizer, rows: Sequence[dict], refusal: str, mc_format: str, chat: bool,
                       batch_size: int, progress: bool = True) -> np.ndarray:
    """P(answer) / (P(answer) + P(refusal)) under pass 2 for each cached question."""
    scores = []
    for start in tqdm(range(0, len(rows), batch_size), desc="Doubter confidence", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        answers = [pass1_answer_text(row, mc_format) for row in batch]
        prompts = [row["prompt"] for row in batch] * 2
        features = torch.as_tensor(np.stack([row["features"] for row in batch])).float().repeat(2, 1, 1)
        logprobs = continuation_logprobs(model, tokenizer, prompts, answers + [refusal] * len(batch), features, chat)
        answer_lp, refusal_lp = logprobs[: len(batch)], logprobs[len(batch):]
        scores.append(torch.sigmoid(answer_lp - refusal_lp).numpy())
    return np.concatenate(scores)


def pass1_answer_text(row: dict, mc_format: str) -> str:
    if row["choices"]:
        return LETTERS[row["pass1_choice"]] if mc_format == "letter" else row["choices"][row["pass1_choice"]]
    return row["pass1_answer"] or " "


@torch.no_grad()
def generate_actions(model, tokenizer, rows: Sequence[dict], batch_size: int, max_answer_tokens: int, refusal: str,
                     judge, chat: bool, mc_format: str) -> tuple[list[str], list[bool], list[bool], list[str]]:
    """Greedy two-pass generation: per question the action (answered / declined / corrected), whether the final
    answer is right, whether an answer differs from pass 1, and the text."""
    tokenizer.padding_side = "left"
    actions, right, changed, texts = [], [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="Two-pass generation", unit="batch"):
        batch = rows[start:start + batch_size]
        inputs = tokenizer([row["prompt"] for row in batch], return_tensors="pt", padding=True,
                           add_special_tokens=not chat).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_answer_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        for row, tokens in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
            text = first_line(tokenizer.decode(tokens, skip_special_tokens=True))
            texts.append(text)
            if is_refusal(text, refusal):
                actions.append("declined")
                right.append(False)
                changed.append(False)
                continue
            answer = extract_correction(text) if is_correction(text) else text
            actions.append("corrected" if is_correction(text) else "answered")
            is_right = _judge(row, answer, judge, mc_format)
            right.append(is_right)
            changed.append(normalize_answer(answer) != normalize_answer(pass1_answer_text(row, mc_format)))
    return actions, right, changed, texts


def _judge(row: dict, answer: str, judge, mc_format: str) -> bool:
    if not row["choices"]:
        return bool(answer) and judge(row["question"], answer, list(row["answers"]))
    if mc_format == "letter":
        return extract_letter(answer, len(row["choices"])) == row["label"]
    return normalize_answer(answer) == normalize_answer(row["choices"][row["label"]])


def pass_one_features(rows: Sequence[dict]) -> list[PassOneFeatures]:
    return [
        PassOneFeatures(
            token_logprobs=list(row["token_logprobs"]),
            first_token_top2_logprobs=tuple(row["first_top2"]) if len(row["first_top2"]) == 2 else None,
            first_token_entropy=None if np.isnan(row["first_entropy"]) else float(row["first_entropy"]),
            option_logprobs=list(row["option_logprobs"]),
        )
        for row in rows
    ]
