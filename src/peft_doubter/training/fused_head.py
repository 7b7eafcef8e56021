"""The frozen LM head's log-probabilities of a few tokens per position, without keeping the (N, V) logits.

Gemma's vocabulary has 262k entries: the cross-entropy through `log_softmax` on full-vocabulary logits keeps them,
their log-softmax, and allocates two more zero-filled (N, V) gradients in the backward pass, which cost as much as
the LM head itself. `picked_log_probs` computes, a chunk of the vocabulary at a time, each position's
log-normaliser and its logits at the picked tokens, together with the normaliser's gradient with respect to the
hidden state (softmax @ W, exact); the backward pass is then an (N, H) sum. The head's weight is frozen (the Doubter never trains it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class _PickedLogits(torch.autograd.Function):
    """(logsumexp (N,), logits at `picks` (N, P)) of `softcap(scale * (hidden @ weight.T + bias))`; gradients for
    `hidden` only. The vocabulary is walked in chunks with a running maximum (as in online softmax), so the weight
    is read once and every row shares each chunk's matrix product."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                picks: torch.Tensor, scale: float, softcap: Optional[float], chunk_columns: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, needs_grad = len(hidden), ctx.needs_input_grad[0]  # no gradient (evaluation): no second product
        running_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=hidden.device)
        total = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        normaliser_grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # d logsumexp/d hidden
        for start in range(0, len(weight), chunk_columns):
            columns = slice(start, start + chunk_columns)
            logits, slope = _transformed(nn.functional.linear(
                hidden, weight[columns], None if bias is None else bias[columns]).float(), scale, softcap)
            new_max = torch.maximum(running_max, logits.max(-1).values)
            correction = (running_max - new_max).exp()
            probabilities = logits.sub_(new_max[:, None]).exp_()  # unnormalised, relative to the running maximum
            total = total * correction + probabilities.sum(-1)
            running_max = new_max
            if not needs_grad:
                continue
            if slope is not None:
                probabilities.mul_(slope)
            normaliser_grad = normaliser_grad * correction[:, None] + (
                probabilities.to(weight.dtype) @ weight[columns]).float()
        picked_rows = weight[picks].float()  # (N, P, H)
        picked, pick_slopes = _transformed(
            torch.einsum("nh,nph->np", hidden.float(), picked_rows) + (0 if bias is None else bias[picks].float()),
            scale, softcap)
        ctx.save_for_backward(normaliser_grad / total[:, None], picked_rows,
                              pick_slopes if pick_slopes is not None else torch.ones_like(picked))
        ctx.hidden_dtype = hidden.dtype
        return running_max + total.log(), picked

    @staticmethod
    def backward(ctx: Any, normaliser_output_grad: torch.Tensor, picked_output_grad: torch.Tensor) -> tuple:
        normaliser_grad, picked_rows, pick_slopes = ctx.saved_tensors
        grad = normaliser_output_grad[:, None] * normaliser_grad
        grad = grad + torch.einsum("np,nph->nh", picked_output_grad * pick_slopes, picked_rows)
        return grad.to(ctx.hidden_dtype), None, None, None, None, None, None


def _transformed(logits: torch.Tensor, scale: float, softcap: Optional[float]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(softcap(scale * logits), its slope with respect to `logits`, None where it is 1), in place."""
    if scale == 1.0 and softcap is None:
        return logits, None
    logits.mul_(scale)
    if softcap is None:
        return logits, torch.full_like(logits[..., :1], scale).expand_as(logits)
    capped = logits.div_(softcap).tanh_()
    slope = (1 - capped * capped) * scale
    return capped.mul_(softcap), slope


def logit_transform(config: Any) -> tuple[float, Optional[float]]:
    """(scale, soft cap) that the causal-LM head of `config`'s family applies to its logits: Cohere's
    `logit_scale`, Granite's `logits_scaling` (a divisor), Gemma 2/3's `final_logit_softcapping`."""
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


def picked_log_probs(hidden: torch.Tensor, lm_head: nn.Linear, picks: torch.Tensor, scale: float = 1.0,
                     softcap: Optional[float] = None, chunk_columns: int = 16384) -> torch.Tensor:
    """Log-probabilities (N, P) of the tokens `picks` (N, P) under the LM head at the states `hidden` (N, H), the
    logits scaled by `scale` and then soft-capped at `softcap` (see `logit_transform`); equal to
    `log_softmax(...)` of the full logits at the picks, value and gradient, at a fraction of the time and memory."""
    if lm_head.weight.requires_grad:
        raise ValueError("picked_log_probs trains no LM head: its weight must be frozen.")
    log_normaliser, picked = _PickedLogits.apply(hidden, lm_head.weight, lm_head.bias, picks, scale, softcap,
                                                 chunk_columns)
    return picked - log_normaliser[:, None]
