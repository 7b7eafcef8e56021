"""The Doubter's confidence in the base's own answer, as log-odds (which keep their precision where the probability
saturates; the confidence is their sigmoid).

* `decision`: at the first answer position of pass 2, the probability p of starting the refusal: log-odds
  `log(1 - p) - log p`. One pass-2 step over the prompt; independent of the answer's length.
* `ratio`: `log P(answer) - log P(refusal)` of the teacher-forced continuations under pass 2.
"""

from __future__ import annotations

import torch


def decision_log_odds(logits: torch.Tensor, refusal_token: torch.Tensor | int) -> torch.Tensor:
    """(B,) log-odds of answering from the logits at the first answer position (B, V) and the refusal's first
    token per row (or one for all)."""
    logprobs = logits.float().log_softmax(-1)
    token = torch.as_tensor(refusal_token, device=logits.device).expand(logits.shape[0])
    return answer_log_odds(logprobs.gather(-1, token[:, None]).squeeze(-1))


def answer_log_odds(refusal_log_prob: torch.Tensor) -> torch.Tensor:
    """log(1 - p) - log p from the refusal's log-probability log p (stable near p = 1)."""
    refusal_log_prob = refusal_log_prob.float()
    return torch.log(-torch.expm1(refusal_log_prob.clamp_max(-1e-7))) - refusal_log_prob


def ratio_log_odds(answer_logprob: torch.Tensor, refusal_logprob: torch.Tensor) -> torch.Tensor:
    """(B,) log P(answer) - log P(refusal) of the teacher-forced continuations."""
    return answer_logprob.double() - refusal_logprob.double()
