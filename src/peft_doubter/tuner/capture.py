"""What pass 1 records: the resolved layer plan, the hooks' capture of read-layer states, and position helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..names import SIGNAL_LIMIT, TOKEN_SIGNALS, TOP_K_SIGNALS


class StopForward(Exception):
    """Raised by a layer hook to end a forward pass early (pass 1 needs no upper layers and no LM head)."""


@dataclass
class LayerPlan:
    """Resolved layer indices of one adapter."""

    read: list[int]
    inject: list[int]

    @property
    def first_inject(self) -> int:
        return self.inject[0]

    def pass1_stop(self, reuse_prefix: bool) -> int:
        """Deepest layer pass 1 must run: the deepest read layer, or the layer below the first inject layer."""
        deepest = self.read[-1]
        return max(deepest, self.first_inject - 1) if reuse_prefix else deepest


@dataclass
class Capture:
    """What the layer hooks record during one forward pass."""

    read_layers: list[int]
    pooling: str
    positions: torch.Tensor  # (B,) index of the last prompt token per row
    prompt_mask: Optional[torch.Tensor]  # (B, S) prompt tokens, for mean pooling
    keep_output_of: Optional[int] = None
    stop_after: Optional[int] = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    kept_output: Any = None
    every_position: bool = False  # keep each read layer's whole output (B, S, H) instead of pooling

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.every_position:
            return hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, self.positions.to(hidden.device)]  # (B, H)
        if self.pooling == "last":
            return last
        mask = self.prompt_mask.to(hidden.device, hidden.dtype)[..., None]  # (B, S, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
        return mean if self.pooling == "mean" else torch.cat([last, mean], dim=-1)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.features[i] for i in self.read_layers], dim=1).float()  # (B, R, D_in)



@dataclass
class Reading:
    """What pass 1 hands the encoder. `features` (B, R, D): the read layers' states at the read position, pooled;
    with an answer read (`read_position='answer'`) also every answer token's states and signals, zero-padded:
    `answer_states` (B, L, R, H) divided by their own RMS per vector (encoders start with a LayerNorm, which that
    scale does not change; it keeps Gemma's residual stream, up to 1e5 at late layers, within float16),
    `answer_mask` (B, L) and `token_signals` (B, L, S) with the columns of `TOKEN_SIGNALS`; for a multiple-choice
    answer `choice_signals` (B, S): the same columns for the distribution over the options (see `choice_signals`),
    NaN in rows without options."""

    features: torch.Tensor
    answer_states: Optional[torch.Tensor] = None
    answer_mask: Optional[torch.Tensor] = None
    token_signals: Optional[torch.Tensor] = None
    choice_signals: Optional[torch.Tensor] = None

    def to(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
           non_blocking: bool = False) -> Reading:
        """Moved to `device`; floating tensors cast to `dtype` when given (Trainer moves batches this way too)."""
        def move(x: Optional[torch.Tensor], floating: bool = True) -> Optional[torch.Tensor]:
            if x is None:
                return None
            return x.to(device, dtype if floating else None, non_blocking=non_blocking)

        return Reading(move(self.features), move(self.answer_states), move(self.answer_mask, False),
                       move(self.token_signals), move(self.choice_signals))

    def repeat(self, times: int) -> Reading:
        """The same reading for `times` copies of the batch (e.g. scoring two continuations per question)."""
        def rep(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.repeat(times, *([1] * (x.ndim - 1)))

        return Reading(rep(self.features), rep(self.answer_states), rep(self.answer_mask), rep(self.token_signals),
                       rep(self.choice_signals))


def rms_normalized(states: torch.Tensor) -> torch.Tensor:
    """`states / rms(states)` over the last dimension (what `Reading.answer_states` holds)."""
    return states / states.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6).to(states.dtype)


def token_signals(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token signals (L, S) of a generated answer from its step logits (L, V) and tokens (L,): the token's
    log-probability, the entropy of the distribution and its top-k log-probabilities (`TOKEN_SIGNALS`)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    top = logprobs.topk(TOP_K_SIGNALS, dim=-1).values
    return torch.cat([chosen[:, None], entropy[:, None], top], dim=-1)


def choice_signals(option_scores: Sequence[Sequence[float]]) -> torch.Tensor:
    """`TOKEN_SIGNALS` of multiple-choice answers (B, S), from each question's option scores (any log scale, e.g.
    cloze log-likelihoods): over the softmax of the scores, the log-probability of the chosen (best) option, the
    entropy and the top-k log-probabilities (-`SIGNAL_LIMIT` past the last option). A row with fewer than two
    options is NaN (an open answer has no options)."""
    rows = torch.full((len(option_scores), len(TOKEN_SIGNALS)), float("nan"))
    for index, scores in enumerate(option_scores):
        if len(scores) < 2:
            continue
        logprobs = torch.as_tensor(np.asarray(scores, dtype=np.float64)).log_softmax(-1)
        top = torch.full((TOP_K_SIGNALS,), -SIGNAL_LIMIT, dtype=torch.float64)
        ranked = logprobs.sort(descending=True).values[:TOP_K_SIGNALS]
        top[: len(ranked)] = ranked
        entropy = -(logprobs.exp() * logprobs).sum()
        rows[index] = torch.cat([ranked[:1], entropy[None], top]).float()
    return rows


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    """Temporarily replace `module.forward`, restoring whatever was there (e.g. TRL's fused-LM-head patch)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side (what `generate` uses)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token per row, for left or right padding."""
    seq_len = attention_mask.shape[1]
    return seq_len - 1 - attention_mask.flip(-1).long().argmax(-1)


def prompt_end_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token per row: the position before the first supervised (label != -100) token."""
    supervised = labels != -100
    if not supervised.any(-1).all():
        raise ValueError("Every row of `labels` needs at least one supervised token (label != -100).")
    first_target = supervised.long().argmax(-1)
    if (first_target == 0).any():
        raise ValueError("A row of `labels` supervises its first token, so it has no prompt for pass 1 to read.")
    return first_target - 1

