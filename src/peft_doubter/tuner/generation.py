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

from .capture import Capture, forward_replaced, position_ids_from_mask
from .config import DoubterConfig


@dataclass
class _FirstStep:
    """`generate`'s first step, computed during the pass-2 prefill: its output and each layer's last-token KV."""

    output: Any
    last_token_kv: list[tuple[torch.Tensor, torch.Tensor]]



class TwoPassGenerationMixin:
    """`DoubterModel.generate` and its parts (mixed into the tuner, which provides pass 1 and the injection state)."""

    def draft_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                      **kwargs: Any) -> list[list[int]]:
        """The base's own greedy answers (adapter off), cut before the first end token (`eos_token_id`, default
        the generation config's, or padding)."""
        saved_tokens, saved_gain = self._state.tokens, self._state.gain
        self._state.set(None)
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                          max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self._state.set(saved_tokens, saved_gain)
        stops = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        stops = set(stops if isinstance(stops, (list, tuple)) else [stops]) | {kwargs.get("pad_token_id")}
        answers = []
        for tokens in out[:, input_ids.shape[1]:].tolist():
            cut = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
            answers.append(tokens[:cut])
        return answers

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
            drafts = self.draft_answers(input_ids, attention_mask, config.max_draft_tokens, **draft_kwargs)
            capture = self.read_answers(input_ids, attention_mask, drafts)
            with torch.no_grad():
                tokens = self.encode(capture.stacked())
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
                self._state.gain = config.agc_floor + (1 - config.agc_floor) * math.exp(-step / config.agc_tau)
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
