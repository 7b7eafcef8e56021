"""The Doubter's confidence on cached questions, and what it writes.

The confidence is computed as log-odds (see `peft_doubter.tuner.confidence`): `decision` reads the probability of
starting the refusal at the end of the prompt in pass 2, `ratio` compares the teacher-forced probabilities of the
base's own answer and of the refusal, `head` is the encoder's linear head on pass 1's reading (no pass 2). Log-odds
keep their precision where the probability saturates, so the ranking metrics and the stored per-question scores are
exact. Its text behaviour (greedy two-pass generation) is reported
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
from ..data.sequences import align_prompts, cached_reading, first_target_token, target_columns, tokenize_example
from ..tuner.capture import Reading
from ..tuner.confidence import decision_log_odds, ratio_log_odds
from .baselines import PassOneFeatures


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                          features: torch.Tensor | Reading, chat: bool) -> torch.Tensor:
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


@torch.no_grad()
def decision_scores(model, tokenizer, rows: Sequence[dict], refusal: str, chat: bool) -> torch.Tensor:
    """Decision log-odds (B,) of cached questions: one pass-2 step at the end of each prompt. Rows holding their
    cached lower-layer states (`prefix_hidden`, from a prompt + target sequence) start pass 2 at the first inject
    layer; only the prompt's states matter (attention is causal)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=not chat)["input_ids"]
        token = first_target_token(tokenizer, row["prompt"], refusal, chat)
        sequence = {"input_ids": prompt_ids + [token], "labels": [-100] * len(prompt_ids) + [token]}
        if "prefix_hidden" in row:
            sequence["prefix_hidden"] = np.asarray(row["prefix_hidden"], dtype=np.float32)[: len(prompt_ids) + 1]
        sequences.append(sequence)
    batch = align_prompts(sequences, pad, prefix="prefix_hidden" if "prefix_hidden" in rows[0] else None)
    device = model.device
    attentive = model.peft_config[model.active_adapter].encoder_type == "attentive"
    decision_column = batch["labels"].shape[1] - 2  # the prompts end in the second-to-last column
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   pass1_features=cached_reading(rows, answer=attentive),
                   prefix_hidden=batch.get("prefix_hidden"), logits_to_keep=torch.tensor([decision_column])).logits
    tokens = torch.tensor([seq["input_ids"][-1] for seq in sequences])
    return decision_log_odds(logits[:, 0], tokens).cpu()


def doubter_log_odds(model, tokenizer, rows: Sequence[dict], refusal: str, mc_format: str, chat: bool,
                     batch_size: int, progress: bool = True) -> np.ndarray:
    """The Doubter's confidence in each cached question's pass-1 answer, as float64 log-odds (its sigmoid is the
    confidence), by the adapter's `confidence` (`decision`, `ratio` or `head`)."""
    kind = model.peft_config[model.active_adapter].confidence
    attentive = model.peft_config[model.active_adapter].encoder_type == "attentive"
    scores = []
    for start in tqdm(range(0, len(rows), batch_size), desc="Doubter confidence", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        if kind == "head":
            with torch.no_grad():
                log_odds = model.base_model.head_log_odds(cached_reading(batch, answer=attentive))
            scores.append(log_odds.double().cpu().numpy())
            continue
        if kind == "decision":
            scores.append(decision_scores(model, tokenizer, batch, refusal, chat).double().numpy())
            continue
        answers = [pass1_answer_text(row, mc_format) for row in batch]
        prompts = [row["prompt"] for row in batch] * 2
        reading = cached_reading(batch, answer=attentive).repeat(2)
        logprobs = continuation_logprobs(model, tokenizer, prompts, answers + [refusal] * len(batch), reading, chat)
        scores.append(ratio_log_odds(logprobs[: len(batch)], logprobs[len(batch):]).numpy())
    return np.concatenate(scores)


def sigmoid(log_odds: np.ndarray) -> np.ndarray:
    """The confidence in [0, 1] from log-odds (float64)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(log_odds, dtype=np.float64)))


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
