"""What pass 1 records: the resolved layer plan, the hooks' capture of read-layer states, and position helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


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

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, self.positions.to(hidden.device)]  # (B, H)
        if self.pooling == "last":
            return last
        mask = self.prompt_mask.to(hidden.device, hidden.dtype)[..., None]  # (B, S, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
        return mean if self.pooling == "mean" else torch.cat([last, mean], dim=-1)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.features[i] for i in self.read_layers], dim=1).float()  # (B, R, D_in)



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

