"""Gates: what decides whether a drafted answer is good enough. Every scorer maps cached-question rows (what
`collect_batch` writes: the base's answer, its signals and pass-1 reading) to confidences in [0, 1], so gates are
compared on the same drafts: the Doubter, the answer's minimum-token probability, a probe on the read-layer states
(fit on the run's train split) and a seeded random gate."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..evaluation.baselines import LogisticProbe
from ..evaluation.confidence import doubter_log_odds, sigmoid


class Scorer(Protocol):
    name: str

    def __call__(self, rows: Sequence[dict]) -> np.ndarray: ...


class DoubterScorer:
    """The Doubter's confidence (its `confidence`: decision or ratio), exactly as `peft-doubter eval` computes it."""

    name = "doubter"

    def __init__(self, model, tokenizer, mc_format: str, chat: bool) -> None:
        self.model, self.tokenizer, self.mc_format, self.chat = model, tokenizer, mc_format, chat
        self.refusal = model.peft_config[model.active_adapter].refusal_text

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        return sigmoid(doubter_log_odds(self.model, self.tokenizer, rows, self.refusal, self.mc_format, self.chat,
                                        batch_size=8, progress=False))


class MinTokenScorer:
    """The probability of the answer's least likely token (FLARE's trigger): no training."""

    name = "min_token"

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        return np.array([float(np.exp(min(row["token_logprobs"]))) for row in rows])


class ProbeScorer:
    """A logistic probe on the read-layer states, fit on the run's train split."""

    name = "probe"

    def __init__(self, train_rows: Sequence[dict], seed: int = 0) -> None:
        features = np.stack([np.asarray(r["features"], dtype=np.float64).ravel() for r in train_rows])
        self.probe = LogisticProbe(seed=seed).fit(features, [bool(r["correct"]) for r in train_rows])

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        return self.probe.predict_proba(np.stack([np.asarray(r["features"], dtype=np.float64).ravel()
                                                  for r in rows]))


class RandomScorer:
    """A reproducible random confidence per question and prompt (a hash), the gate that knows nothing."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        digests = (hashlib.sha256(f"{self.seed}:{row['prompt']}".encode()).digest() for row in rows)
        return np.array([int.from_bytes(d[:8], "big") / 2**64 for d in digests])
