"""Two-pass generation: pass 1 on the prompt (or the base's own draft answer), then `generate` with the cognitive
tokens frozen (or refreshed on drift), reusing pass 1's KV cache below the first inject layer, with the first decoding
step taken from the pass-2 prefill and optional automatic gain control."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from . import backbone
from .capture import Capture, Reading, forward_replaced, position_ids_from_mask, rms_normalized, token_signals
from .config import DoubterConfig


@dataclass
class Draft:
    """The base's own greedy answers (adapters off) and what pass 1 read of them.

    `tokens`: each row's kept answer tokens (cut before the first stop token, at most `max_new_tokens`);
    `step_signals`: each row's `TOKEN_SIGNALS` (L, S) at its kept tokens, or at its first generated token when the
    answer is empty; `prompt_features` (B, R, D): the read layers at the prompt's last token, pooled as configured;
    `reading`: the read layers at the answer's last token (the prompt's last for an empty answer) with every answer
    token's states and signals."""

    tokens: list[list[int]]
    step_signals: list[torch.Tensor]
    prompt_features: torch.Tensor
    reading: Reading


def _common_prefix_length(rows: list[torch.Tensor]) -> int:
    """Leading tokens shared by every row, leaving at least one token of each row to prefill apart."""
    width = min(len(row) for row in rows) - 1
    if width <= 0:
        return 0
    matrix = torch.stack([row[:width] for row in rows])
    differs = (matrix != matrix[:1]).any(0)
    return int(differs.nonzero()[0]) if differs.any() else width


def _left_padded(rows: list[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = like.new_zeros((len(rows), width))
    mask = like.new_zeros((len(rows), width))
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return ids, mask


def _assemble_draft(generated: list[list[int]], signals: list[list[torch.Tensor]],
                    states: list[list[torch.Tensor]], prompt_features: torch.Tensor, stops: set[int],
                    max_new_tokens: int) -> Draft:
    """A `Draft` from what the decoding loop recorded per row: generated tokens, their signals, consumed states."""
    batch, layers = prompt_features.shape[0], prompt_features.shape[1]
    hidden = next((row[0].shape[-1] for row in states if row), prompt_features.shape[-1])
    tokens = []
    for sequence in generated:
        cut = next((i for i, token in enumerate(sequence) if token in stops), len(sequence))
        tokens.append(sequence[:min(cut, max_new_tokens)])
    longest = max(1, max(len(t) for t in tokens))
    answer_states = prompt_features.new_zeros((batch, longest, layers, hidden))
    answer_mask = torch.zeros((batch, longest), dtype=torch.bool, device=prompt_features.device)
    token_signal = prompt_features.new_zeros((batch, longest, signals[0][0].shape[-1]))
    last = []
    for row, kept in enumerate(tokens):
        if kept:
            row_states = torch.stack(states[row][: len(kept)])  # (L, R, H)
            answer_states[row, : len(kept)] = rms_normalized(row_states)
            answer_mask[row, : len(kept)] = True
            token_signal[row, : len(kept)] = torch.stack(signals[row][: len(kept)]).to(token_signal)
            last.append(row_states[-1])
        else:
            last.append(prompt_features[row, :, :hidden])
    step_signals = [torch.stack(signals[row][: max(len(kept), 1)]).cpu() for row, kept in enumerate(tokens)]
    return Draft(tokens, step_signals, prompt_features, Reading(torch.stack(last), answer_states, answer_mask,
                                                                token_signal))


@dataclass
class _FirstStep:
    """`generate`'s first step, computed during the pass-2 prefill: its output and each layer's last-token KV."""

    output: Any
    last_token_kv: list[tuple[torch.Tensor, torch.Tensor]]



class TwoPassGenerationMixin:
    """`DoubterModel.generate` and its parts (mixed into the tuner, which provides pass 1 and the injection state)."""

    def draft(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              eos_token_id: Optional[int | list[int]] = None, pad_token_id: Optional[int] = None) -> Draft:
        """The base's own greedy answers (adapters off) and pass 1's reading of them, in one decoding loop.

        The read layers are recorded at the prompt's last token (the prefill) and at every answer token when it is
        consumed by the next decoding step, so reading the answer costs no second forward pass; decoding runs one
        token past `max_new_tokens` so the last kept token is consumed too. Answers end before the first
        `eos_token_id` (default: the generation config's) or `pad_token_id`. For speed on a batch, the prompts'
        common leading tokens (e.g. few-shot exemplars) are computed once and shared, and finished rows leave the
        batch; the result is greedy decoding of each prompt (tests compare it with `generate`)."""
        self._check_prompt(input_ids, attention_mask)
        name = self.active_adapters[0]
        config, plan = self.peft_config[name], self._plans[name]
        stops = eos_token_id if eos_token_id is not None else self.model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, (list, tuple)) else [stops]) | {pad_token_id} - {None}
        stop_ids = torch.tensor(sorted(stops), device=input_ids.device)
        batch = input_ids.shape[0]
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        shared = _common_prefix_length(rows) if batch > 1 and config.pooling == "last" else 0
        window = getattr(backbone.text_config(self.model), "sliding_window", None)
        if window is not None and input_ids.shape[1] + max_new_tokens + 1 > window:
            shared = 0  # padding between the shared prefix and a row would move that row's sliding window
        cache = self._new_cache()
        generated: list[list[int]] = [[] for _ in range(batch)]
        signals: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        states: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        try:
            with torch.no_grad(), self._injection_off():
                if shared:
                    self.model(input_ids=rows[0][None, :shared], use_cache=True, past_key_values=cache,
                               logits_to_keep=1)
                    cache.batch_repeat_interleave(batch)
                suffix_ids, suffix_mask = _left_padded([row[shared:] for row in rows], input_ids)
                mask = torch.cat([suffix_mask.new_ones((batch, shared)), suffix_mask], dim=1)
                prompt = Capture(read_layers=plan.read, pooling=config.pooling, prompt_mask=(
                    suffix_mask.bool() if config.pooling != "last" else None), positions=torch.full(
                    (batch,), suffix_ids.shape[1] - 1, device=input_ids.device))
                self._capture = prompt
                logits = self.model(input_ids=suffix_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                                    position_ids=position_ids_from_mask(mask)[:, shared:], logits_to_keep=1
                                    ).logits[:, -1]
                self._capture = None
                active = torch.arange(batch, device=input_ids.device)
                for step in range(max_new_tokens + 1):
                    next_tokens = logits.argmax(-1)
                    step_signals = token_signals(logits, next_tokens)
                    for index, row in enumerate(active.tolist()):
                        generated[row].append(int(next_tokens[index]))
                        signals[row].append(step_signals[index])
                    going = ~torch.isin(next_tokens, stop_ids)
                    if step == max_new_tokens or not going.any():
                        break
                    if not going.all():
                        keep = going.nonzero().squeeze(-1)
                        cache.batch_select_indices(keep)
                        active, mask, next_tokens = active[keep], mask[keep], next_tokens[keep]
                    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                    self._capture = Capture(read_layers=plan.read, pooling="last", prompt_mask=None,
                                            positions=torch.zeros(len(active), dtype=torch.long, device=mask.device))
                    logits = self.model(input_ids=next_tokens[:, None], attention_mask=mask, past_key_values=cache,
                                        use_cache=True, position_ids=position_ids_from_mask(mask)[:, -1:]
                                        ).logits[:, -1]
                    consumed = self._capture.stacked()  # (A, R, H): the states of the token each row just consumed
                    self._capture = None
                    for index, row in enumerate(active.tolist()):
                        states[row].append(consumed[index])
        finally:
            self._capture = None
        return _assemble_draft(generated, signals, states, prompt.stacked(), stops, max_new_tokens)

    # ----------------------------------------------------------------------------------------- generate
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        reuse_prefix: bool = True,
        agc: Optional[bool] = None,
        dynamic_refresh: Optional[bool] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Two-pass generation: pass 1 on the prompt, then `generate` with the cognitive tokens frozen (or refreshed
        on drift when `dynamic_refresh`), reusing pass 1's KV cache below the first inject layer. Batches must be
        left-padded. `agc` and `dynamic_refresh` default to the adapter config. With `read_position='answer'`,
        pass 1 first drafts the base's own greedy answer (stopping at `eos_token_id`) and reads prompt + draft;
        pass 2 then recomputes the whole prompt. With `inputs_embeds`, pass 1 reads the embeddings and pass 2
        recomputes the whole prompt too."""
        if self._active is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise ValueError("Doubter generation builds its own KV cache from pass 1: pass no `past_key_values`.")
        embeds = kwargs.get("inputs_embeds")
        prompt = embeds if embeds is not None else input_ids
        if attention_mask is None and prompt is not None:
            attention_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        self._check_prompt(prompt, attention_mask)
        if not attention_mask[:, -1].bool().all():
            raise ValueError("Doubter generation needs left padding: set `tokenizer.padding_side = 'left'`.")
        config: DoubterConfig = self.peft_config[self._active]
        plan = self._plans[self._active]
        agc = config.agc_enabled if agc is None else agc
        refresh = config.dynamic_refresh if dynamic_refresh is None else dynamic_refresh
        if embeds is not None:
            if config.read_position == "answer":
                raise ValueError("With read_position='answer', pass 1 drafts an answer from `input_ids`; "
                                 "`inputs_embeds` are not supported.")
            last = torch.full((prompt.shape[0],), prompt.shape[1] - 1, device=prompt.device)
            capture = self.run_pass1(None, attention_mask, last, keep_prefix=False, inputs_embeds=embeds,
                                     position_ids=position_ids_from_mask(attention_mask))
            with torch.no_grad():
                tokens = self.encode(capture.stacked())
            with self._injecting(tokens), self._decode_controls(config, agc, refresh, capture):
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if config.read_position == "answer":
            draft_kwargs = {k: kwargs[k] for k in ("eos_token_id", "pad_token_id") if k in kwargs}
            reading = self.read_draft(input_ids, attention_mask, config.max_draft_tokens, **draft_kwargs)
            with torch.no_grad():
                tokens = self.encode(reading)
            capture = Capture(read_layers=plan.read, pooling=config.pooling, positions=torch.full(
                (input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device), prompt_mask=None)
            capture.features = dict(zip(plan.read, reading.features.unbind(1)))
            with self._injecting(tokens), self._decode_controls(config, agc, refresh, capture):
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        read_positions = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        positions = position_ids_from_mask(attention_mask)
        reuse = reuse_prefix and plan.first_inject > 0 and not (
            kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
        )
        pass1_cache = self._new_cache(record_past=True) if reuse else None
        capture = self.run_pass1(
            input_ids, attention_mask, read_positions, keep_prefix=reuse, past_key_values=pass1_cache,
            position_ids=positions,
        )
        with torch.no_grad():
            tokens = self.encode(capture.stacked())
        first_step = None
        if reuse:
            kwargs["past_key_values"], first_step = self._prefill_pass2(
                input_ids, attention_mask, positions, capture, tokens, pass1_cache
            )
        with self._injecting(tokens), self._first_step_shortcut(first_step), self._decode_controls(
            config, agc, refresh, capture
        ):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _new_cache(self, record_past: bool = False) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        if record_past:
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.activate_past_recording()
        return cache

    def _prefill_pass2(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        capture: Capture,
        tokens: torch.Tensor,
        pass1_cache: DynamicCache,
    ) -> tuple[DynamicCache, _FirstStep]:
        """Pass 2 over the prompt: layers below the first inject layer replay pass 1 (output and KV cache), the rest
        run with injection. Returns the cache without the last prompt token (`generate` processes that one) and the
        shortcut that hands `generate` the already computed last-token step."""
        first_inject = self._plans[self._active].first_inject
        cache = self._new_cache(record_past=True)
        with torch.no_grad(), self._injecting(tokens), self._replaying(first_inject, capture.kept_output):
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        last_token_kv = []
        for index in range(len(cache.layers)):
            if index < first_inject:
                cache.layers[index] = pass1_cache.layers[index]
            layer = cache.layers[index]
            last_token_kv.append((layer.keys[..., -1:, :], layer.values[..., -1:, :]))
            layer.crop(-1)  # sliding-window layers record their past here, so this also trims them to the window
            if getattr(layer, "record_past", False):
                layer.record_past = False
        return cache, _FirstStep(output, last_token_kv)

    @contextlib.contextmanager
    def _first_step_shortcut(self, first_step: Optional[_FirstStep]) -> Iterator[None]:
        """`generate`'s first model call (the last prompt token) returns the step `_prefill_pass2` already computed
        instead of running it again; later calls run normally."""
        if first_step is None:
            yield
            return
        model = self.model
        calls = 0

        def shortcut(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                return original(*args, **kwargs)
            cache = first_step.output.past_key_values
            for layer, (keys, values) in zip(cache.layers, first_step.last_token_kv):
                layer.update(keys, values)
            return first_step.output

        original = model.forward
        shortcut.__signature__ = inspect.signature(original)  # `generate` validates kwargs against it
        with forward_replaced(model, shortcut):
            yield

    @contextlib.contextmanager
    def _decode_controls(self, config: DoubterConfig, agc: bool, refresh: bool, capture: Capture) -> Iterator[None]:
        """Per decoding step: the AGC gain `floor + (1 - floor) exp(-step / tau)` and, with dynamic refresh,
        re-encoding the cognitive tokens of rows whose live read-layer state drifted from pass 1's."""
        if not agc and not refresh:
            yield
            return
        step = 0
        reference = capture.stacked()  # (B, R, D_in)
        live = Capture(read_layers=capture.read_layers, pooling="last", positions=capture.positions,
                        prompt_mask=None)
        hidden = reference.shape[-1] // (2 if config.pooling == "last_mean" else 1)
        running_sum = count = None
        if config.pooling != "last":  # mean pooling continues as a running mean over generated tokens
            count = capture.prompt_mask.sum(-1).float()[:, None, None]
            running_sum = reference[..., -hidden:] * count

        def before_step(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if agc:
                decay = config.agc_floor + (1 - config.agc_floor) * math.exp(-step / config.agc_tau)
                self._state.gain = self._gain * decay
            if refresh:
                ids = kwargs.get("input_ids")
                if ids is None or ids.shape[1] == 0:  # the prefill of a generation from `inputs_embeds`
                    ids = kwargs["inputs_embeds"]
                live.positions = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
                live.features = {}
                self._capture = live

        def after_step(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            nonlocal step, running_sum, count
            step += 1
            if not refresh:
                return
            self._capture = None
            if not live.features:  # the first step was computed during the prefill
                return
            current = live.stacked()  # (B, R, H)
            if running_sum is not None:
                running_sum, count = running_sum + current, count + 1
                mean = running_sum / count
                current = mean if config.pooling == "mean" else torch.cat([current, mean], dim=-1)
            if step % config.refresh_interval:
                return
            similarity = F.cosine_similarity(current, reference, dim=-1).mean(-1)  # (B,)
            drifted = similarity < config.refresh_threshold
            if drifted.any():
                with torch.no_grad():
                    fresh = self.encode(current)
                tokens = torch.where(drifted[:, None, None], fresh.to(self._state.tokens), self._state.tokens)
                self._state.set(tokens, self._state.gain)

        handles = [
            self.model.register_forward_pre_hook(before_step, with_kwargs=True),
            self.model.register_forward_hook(after_step, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._capture = None
