"""Training targets from the pass-1 oracle: confirm when the base was right, otherwise refuse (or correct)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import datasets

from ..data.prompts import gold_answer
from ..data.sequences import first_target_token, tokenize_example
from ..names import CORRECTION_PREFIX
from ..tuner.config import DoubterConfig


Action = Literal["confirm", "refuse", "correct"]


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


READING_COLUMNS = ("answer_states", "token_signals", "option_logprobs")  # what the `attentive` encoder reads besides features


def build_training_set(cache: datasets.Dataset, tokenizer, config: DoubterConfig, mc_format: str, chat: bool,
                       seed: int = 0) -> datasets.Dataset:
    """Tokenized two-pass rows for every cached question: prompt + target (`input_ids`, `labels`), the target's
    `action`, pass 1's cached reading (`pass1_features`, and for the `attentive` encoder the answer's token states
    and signals), the oracle (`correct`) and the refusal's first token (`refusal_token`: where the decision
    confidence is read)."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        target, action = choose_target(row, config, mc_format, seed)
        return {**tokenize_example(tokenizer, row["prompt"], target, chat), "action": action,
                "pass1_features": row["features"],
                "refusal_token": first_target_token(tokenizer, row["prompt"], config.refusal_text, chat)}

    reading = list(READING_COLUMNS) if config.encoder_type == "attentive" else []
    keep = ["input_ids", "labels", "pass1_features", "action", "id", "correct", "refusal_token", *reading]
    converted = cache.map(convert, desc="Building targets")
    return converted.remove_columns([c for c in converted.column_names if c not in keep])
