"""Pass 1 of the Doubter (mixed into `DoubterModel`): the frozen base reads the prompt, or the prompt and an answer,
and the hooks record the read layers; also the states entering the first inject layer, which pass 2 shares."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..names import TOKEN_SIGNALS
from .capture import (
    Capture,
    Reading,
    hidden_of,
    last_token_positions,
    position_ids_from_mask,
    rms_normalized,
    token_signals,
)


class PassOneMixin:
    """Pass 1 and the reads built on it."""

    @contextlib.contextmanager
    def _injection_off(self) -> Iterator[None]:
        """Pass 1 reads the base: no cognitive tokens are injected inside (what was set is restored after)."""
        saved_tokens, saved_gain = self._state.tokens, self._state.gain
        self._state.set(None)
        try:
            yield
        finally:
            self._state.set(saved_tokens, saved_gain)

    def run_pass1(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: torch.Tensor,
        read_positions: torch.Tensor,
        *,
        keep_prefix: bool = True,
        past_key_values: Any = None,
        **model_kwargs: Any,
    ) -> Capture:
        """Pass 1: adapters off, no gradients, backbone up to the deepest needed layer only. Returns the pooled
        read-layer features (and the output below the first inject layer, for reuse by pass 2). `input_ids` may be
        None when `inputs_embeds` is among `model_kwargs`."""
        plan = self._plans[self._active or self.active_adapters[0]]
        config = self.peft_config[self.active_adapters[0]]
        keep = plan.first_inject - 1 if keep_prefix and plan.first_inject > 0 else None
        prompt_mask = None
        if config.pooling != "last":
            columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            prompt_mask = attention_mask.bool() & (columns[None, :] <= read_positions[:, None])
        capture = Capture(
            read_layers=plan.read,
            pooling=config.pooling,
            positions=read_positions,
            prompt_mask=prompt_mask,
            keep_output_of=keep,
            stop_after=plan.pass1_stop(keep is not None),
        )
        with torch.no_grad(), self._injection_off(), self._capturing(capture):
            self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
                **model_kwargs,
            )
        missing = [i for i in plan.read if i not in capture.features]
        if missing:
            raise RuntimeError(f"Pass 1 did not reach read layers {missing}; is the decoder run in order?")
        return capture

    def read_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer_ids: Sequence[Sequence[int]]) -> Capture:
        """Pass 1 with `read_position='answer'`: the read-layer features at the last token of each row's answer,
        over prompt + answer (prompts left- or right-padded; an empty answer reads the prompt's last token)."""
        rows = [torch.cat([ids[mask.bool()], torch.as_tensor(list(answer), dtype=ids.dtype, device=ids.device)])
                for ids, mask, answer in zip(input_ids, attention_mask, answer_ids)]
        width = max(len(row) for row in rows)
        ids = input_ids.new_zeros((len(rows), width))
        mask = attention_mask.new_zeros((len(rows), width))
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = row
            mask[index, width - len(row):] = 1
        self._check_prompt(ids, mask)
        return self.run_pass1(ids, mask, torch.full((len(rows),), width - 1, device=ids.device), keep_prefix=False,
                              position_ids=position_ids_from_mask(mask))



    @contextlib.contextmanager
    def capturing_prompt(self, attention_mask: torch.Tensor) -> Iterator[Capture]:
        """Record the read-layer features of the next forward call of the base model only (e.g. `generate`'s
        prefill of a left-padded batch, with adapters disabled: that forward is pass 1), sparing a second prompt
        forward when the base's own answer is generated anyway."""
        config = self.peft_config[self.active_adapters[0]]
        columns = attention_mask.shape[1]
        capture = Capture(
            read_layers=self._plans[self.active_adapters[0]].read,
            pooling=config.pooling,
            positions=torch.full((attention_mask.shape[0],), columns - 1, device=attention_mask.device),
            prompt_mask=attention_mask.bool() if config.pooling != "last" else None,
        )

        def first_call_done(module: nn.Module, args: tuple, output: Any) -> None:
            self._capture = None

        handle = self.model.register_forward_hook(first_call_done)
        self._capture = capture
        try:
            yield capture
        finally:
            handle.remove()
            self._capture = None

    def lower_layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering the first inject layer (B, S, H): identical in both passes (nothing is injected
        below it), so they can be cached once and pass 2 started there (`forward(prefix_hidden=...)`)."""
        first_inject = self._plans[self._active or self.active_adapters[0]].first_inject
        if first_inject == 0:
            raise ValueError("The first inject layer is layer 0: there are no lower layers to cache.")
        capture = Capture(read_layers=[], pooling="last", positions=last_token_positions(attention_mask),
                          prompt_mask=None, keep_output_of=first_inject - 1, stop_after=first_inject - 1)
        with torch.no_grad(), self._injection_off(), self._capturing(capture):
            self.model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return hidden_of(capture.kept_output)

    def read_draft(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                   **kwargs: Any) -> Reading:
        """Pass 1 with `read_position='answer'`: the base drafts its greedy answer and the read layers are read at
        the answer's last token (see `draft`); other poolings than 'last' re-read prompt + answer."""
        draft = self.draft(input_ids, attention_mask, max_new_tokens, **kwargs)
        if self.peft_config[self.active_adapters[0]].pooling != "last":
            draft.reading.features = self.read_answers(input_ids, attention_mask, draft.tokens).stacked()
        return draft.reading

    def read_given_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           answer_ids: Sequence[Sequence[int]], prompt_pass: Any = None) -> Reading:
        """Pass 1's reading of given answers (e.g. a user's answer to score), as `draft` reads the base's own: one
        forward over prompt + answer with adapters off records the read layers at every answer token, and the
        base's probabilities of those tokens give their signals (teacher-forced). With `prompt_pass` (the base's
        output for exactly these left-padded prompts, with its `past_key_values` and last position's logits, e.g.
        the pass that scored cloze options) only the answers run, on a copy of its cache."""
        name = self.active_adapters[0]
        plan = self._plans[name]
        lengths = [len(answer) for answer in answer_ids]
        if prompt_pass is not None and min(lengths) > 0:
            return self._read_answers_after_prompt(prompt_pass, attention_mask, answer_ids, plan.read)
        rows = [torch.cat([ids[mask.bool()], torch.as_tensor(list(answer), dtype=ids.dtype, device=ids.device)])
                for ids, mask, answer in zip(input_ids, attention_mask, answer_ids)]
        width = max(len(row) for row in rows)
        ids, mask = input_ids.new_zeros((len(rows), width)), attention_mask.new_zeros((len(rows), width))
        for index, row in enumerate(rows):
            ids[index, width - len(row):], mask[index, width - len(row):] = row, 1
        self._check_prompt(ids, mask)
        capture = Capture(read_layers=plan.read, pooling="last", positions=torch.full((len(rows),), width - 1),
                          prompt_mask=None, every_position=True)
        longest = max(1, max(lengths))
        with torch.no_grad(), self._injection_off(), self._capturing(capture):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                logits_to_keep=longest + 1).logits  # (B, longest + 1, V)
        hidden = torch.stack([capture.features[i] for i in plan.read], dim=2).float()  # (B, S, R, H)
        # the logits of each answer token come one step earlier
        answers = [(hidden[index, width - length:], logits[index, -length - 1:-1], ids[index, width - length:])
                   for index, length in enumerate(lengths)]
        return answer_reading(hidden[:, -1], answers)

    def _read_answers_after_prompt(self, prompt_pass: Any, attention_mask: torch.Tensor,
                                   answer_ids: Sequence[Sequence[int]], read_layers: list[int]) -> Reading:
        """`read_given_answers` continuing `prompt_pass`'s cache with the (non-empty) answers, right-padded."""
        lengths = [len(answer) for answer in answer_ids]
        width, device = max(lengths), attention_mask.device
        tokens = torch.tensor([list(a) + [0] * (width - len(a)) for a in answer_ids], device=device)
        kept = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answer_ids], device=device)
        mask = torch.cat([attention_mask, kept.to(attention_mask.dtype)], dim=1)
        positions = attention_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
        capture = Capture(read_layers=read_layers, pooling="last", positions=torch.full((len(lengths),), width - 1),
                          prompt_mask=None, every_position=True)
        with torch.no_grad(), self._injection_off(), self._capturing(capture):
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                                past_key_values=copy.deepcopy(prompt_pass.past_key_values)).logits
        predicted = torch.cat([prompt_pass.logits[:, -1:].to(logits.dtype), logits[:, :-1]], dim=1)
        hidden = torch.stack([capture.features[i] for i in read_layers], dim=2).float()  # (B, width, R, H)
        answers = [(hidden[index, :length], predicted[index, :length], tokens[index, :length])
                   for index, length in enumerate(lengths)]
        return answer_reading(torch.stack([hidden[index, length - 1] for index, length in enumerate(lengths)]), answers)


def answer_reading(last: torch.Tensor, answers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Reading:
    """A `Reading` from each row's last read states `last` (B, R, H) and its answer tokens' read states (L, R, H),
    the logits that predicted them (L, V) and their ids (L,): states RMS-normalised and token signals, zero-padded to
    the longest answer (an empty answer reads none)."""
    longest = max(1, max(len(ids) for _, _, ids in answers))
    states = last.new_zeros((len(answers), longest, *last.shape[1:]))
    signals = last.new_zeros((len(answers), longest, len(TOKEN_SIGNALS)))
    answer_mask = torch.zeros((len(answers), longest), dtype=torch.bool)
    for index, (hidden, predicted, ids) in enumerate(answers):
        if len(ids):
            states[index, :len(ids)] = rms_normalized(hidden)
            signals[index, :len(ids)] = token_signals(predicted, ids)
            answer_mask[index, :len(ids)] = True
    return Reading(last, states, answer_mask, signals)
