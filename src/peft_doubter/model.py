"""`DoubterModel`: the PEFT tuner that runs a frozen causal LM in two passes.

Pass 1 runs the backbone (adapters off, no gradients) only up to the deepest layer it needs and pools the read
layers' states at the last prompt token; the encoder turns them into cognitive tokens. Pass 2 reuses pass 1's output
(and, in generation, its KV cache) below the first inject layer and recomputes from there with the gated
cross-attention added after every inject layer.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import DynamicCache

from . import backbone
from ._registry import DOUBTER_PREFIX
from .config import DoubterConfig, resolve_layers
from .layer import CognitiveEncoder, DoubterLayer, InjectionState

_ADAPTER_CONTAINERS = ("doubter_encoder", "doubter_ca")


class _StopForward(Exception):
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
class _Capture:
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


@dataclass
class _FirstStep:
    """`generate`'s first step, computed during the pass-2 prefill: its output and each layer's last-token KV."""

    output: Any
    last_token_kv: list[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Any) -> Iterator[None]:
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


def _hidden_of(output: Any) -> torch.Tensor:
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


class DoubterModel(BaseTuner):
    """Creates a Doubter model from a pretrained causal LM; use it through `get_peft_model(model, DoubterConfig())`.

    The adapter cannot be merged into the base weights (it depends on the input through pass 1): `unload()` gives
    back the untouched base model.
    """

    prefix: str = DOUBTER_PREFIX
    tuner_layer_cls = DoubterLayer
    target_module_mapping: dict = {}
    uses_shared_state = True

    # ------------------------------------------------------------------------------------------------ set-up
    def _pre_injection_hook(self, model: nn.Module, config: DoubterConfig, adapter_name: str) -> None:
        self._ensure_containers()

    def _ensure_containers(self) -> None:
        if "doubter_encoder" not in self._modules:
            self.doubter_encoder = nn.ModuleDict({})
            self._plans: dict[str, LayerPlan] = {}
            self._state = InjectionState()
            self._capture: Optional[_Capture] = None
            self._hook_handles: list = []
            self._adapters_enabled = True

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Resolve layers, check the base fingerprint and build the encoder, then let PEFT wrap the inject layers."""
        self._ensure_containers()
        config: DoubterConfig = self.peft_config[adapter_name]
        n_layers = backbone.num_layers(model)
        plan = LayerPlan(
            read=resolve_layers("target_layers", config.target_layers, n_layers),
            inject=resolve_layers(
                "cross_attn_layers" if config.cross_attn_layers is not None else "target_layers",
                config.inject_layer_spec,
                n_layers,
            ),
        )
        self._check_fingerprint(model, config)
        layers_path, _ = backbone.find_decoder_layers(model)
        config.target_modules = [f"{layers_path}.{i}" for i in plan.inject]
        self._plans[adapter_name] = plan
        device = model.get_input_embeddings().weight.device
        self.doubter_encoder[adapter_name] = CognitiveEncoder(config, backbone.hidden_size(model), len(plan.read)).to(
            device
        )
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            del self.doubter_encoder[adapter_name]
            del self._plans[adapter_name]
            raise
        self._register_layer_hooks()

    def _check_fingerprint(self, model: nn.Module, config: DoubterConfig) -> None:
        actual = backbone.fingerprint(model)
        if config.base_fingerprint is None:
            config.base_fingerprint = actual
            return
        problems = backbone.fingerprint_mismatch(config.base_fingerprint, actual)
        if problems and config.check_base_fingerprint:
            raise ValueError(
                "This Doubter adapter was trained on a different base model; a Doubter is calibrated to one model's "
                "hidden states and does not transfer. Differences: " + "; ".join(problems) + ". To attach it anyway, "
                "load its config, set `check_base_fingerprint=False` and pass it as `config=` to "
                "`PeftModel.from_pretrained`."
            )
        if problems:
            warnings.warn("Attaching a Doubter to a base that differs from its own: " + "; ".join(problems))

    def _prepare_adapter_config(self, peft_config: DoubterConfig, model_config: dict) -> DoubterConfig:
        return peft_config  # `target_modules` is set from the resolved inject layers in `inject_adapter`

    def _create_and_replace(
        self,
        config: DoubterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        num_tokens = self.doubter_encoder[adapter_name].num_tokens
        size = backbone.hidden_size(self.model)
        if isinstance(target, DoubterLayer):
            target.update_layer(adapter_name, config, num_tokens)
            return
        new_module = DoubterLayer(target, adapter_name, config, size, num_tokens, self._state)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)  # whole decoder blocks: no weight to rebind

    def _register_layer_hooks(self) -> None:
        """One output hook on every base decoder block: records read layers, keeps the prefix output, stops early."""
        self._remove_layer_hooks()
        _, layers = backbone.find_decoder_layers(self.model)
        for index, layer in enumerate(layers):
            block = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
            self._hook_handles.append(block.register_forward_hook(self._layer_hook(index)))

    def _remove_layer_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            capture = self._capture
            if capture is None:
                return
            if index in capture.read_layers:
                capture.features[index] = capture.pool(_hidden_of(output))
            if index == capture.keep_output_of:
                capture.kept_output = output
            if index == capture.stop_after:
                raise _StopForward

        return hook

    # ------------------------------------------------------------------------------------- PEFT interface
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_encoder_trainability()

    def _sync_encoder_trainability(self, inference_mode: bool = False) -> None:
        for name, encoder in self.doubter_encoder.items():
            encoder.requires_grad_(name in self.active_adapters and not inference_mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if len(names) != 1:
            raise ValueError(f"The Doubter runs exactly one active adapter, got {names}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_encoder_trainability(inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._adapters_enabled = enabled

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "A Doubter cannot be merged into the base weights: its effect depends on each input through pass 1. "
            "Use `unload()` to get the untouched base model back."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        self._remove_layer_hooks()
        self._state.set(None)
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.doubter_encoder[adapter_name]
        del self._plans[adapter_name]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for container in _ADAPTER_CONTAINERS:
            marker = f"{container}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f"{container}.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _active(self) -> Optional[str]:
        """The adapter that runs, or None when adapters are disabled."""
        if not self._adapters_enabled:
            return None
        name = self.active_adapters[0]
        return name if name in self.doubter_encoder else None

    @property
    def _layers(self) -> nn.ModuleList:
        return backbone.find_decoder_layers(self.model)[1]

    @contextlib.contextmanager
    def _capturing(self, capture: _Capture) -> Iterator[_Capture]:
        self._capture = capture
        try:
            yield capture
        except _StopForward:
            pass
        finally:
            self._capture = None

    @contextlib.contextmanager
    def _injecting(self, tokens: torch.Tensor, gain: float = 1.0) -> Iterator[None]:
        self._state.set(tokens, gain)
        try:
            yield
        finally:
            self._state.set(None)

    @contextlib.contextmanager
    def _replaying(self, upto: int, output: Any) -> Iterator[None]:
        """Layers below `upto` return pass 1's output of layer `upto - 1` instead of recomputing it (they are
        identical in both passes: nothing is injected below the first inject layer)."""
        layers = list(self._layers[:upto]) if output is not None else []
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.enter_context(_forward_replaced(layer, lambda *args, **kwargs: output))
            yield

    def _check_prompt(self, input_ids: Optional[torch.Tensor], attention_mask: torch.Tensor) -> None:
        if input_ids is None:
            raise ValueError("The Doubter needs `input_ids` (pass 1 reads the prompt tokens).")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0 or not attention_mask.bool().any(-1).all():
            raise ValueError("Empty prompt: every row needs at least one non-padding token.")
        limit = getattr(backbone.text_config(self.model), "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(
                f"Input of {input_ids.shape[1]} tokens is longer than the base model's context ({limit} tokens); "
                "truncate the prompt from the left."
            )

    def run_pass1(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_positions: torch.Tensor,
        *,
        keep_prefix: bool = True,
        past_key_values: Any = None,
        **model_kwargs: Any,
    ) -> _Capture:
        """Pass 1: adapters off, no gradients, backbone up to the deepest needed layer only. Returns the pooled
        read-layer features (and the output below the first inject layer, for reuse by pass 2)."""
        plan = self._plans[self._active or self.active_adapters[0]]
        config = self.peft_config[self.active_adapters[0]]
        keep = plan.first_inject - 1 if keep_prefix and plan.first_inject > 0 else None
        prompt_mask = None
        if config.pooling != "last":
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            prompt_mask = attention_mask.bool() & (columns[None, :] <= read_positions[:, None])
        capture = _Capture(
            read_layers=plan.read,
            pooling=config.pooling,
            positions=read_positions,
            prompt_mask=prompt_mask,
            keep_output_of=keep,
            stop_after=plan.pass1_stop(keep is not None),
        )
        saved_tokens, saved_gain = self._state.tokens, self._state.gain
        self._state.set(None)
        try:
            with torch.no_grad(), self._capturing(capture):
                self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=past_key_values,
                    use_cache=past_key_values is not None,
                    **model_kwargs,
                )
        finally:
            self._state.set(saved_tokens, saved_gain)
        missing = [i for i in plan.read if i not in capture.features]
        if missing:
            raise RuntimeError(f"Pass 1 did not reach read layers {missing}; is the decoder run in order?")
        return capture

    def read_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer_ids: Sequence[Sequence[int]]) -> _Capture:
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

    @contextlib.contextmanager
    def capturing_prompt(self, attention_mask: torch.Tensor) -> Iterator[_Capture]:
        """Record the read-layer features of the next forward call of the base model only (e.g. `generate`'s
        prefill of a left-padded batch, with adapters disabled: that forward is pass 1), sparing a second prompt
        forward when the base's own answer is generated anyway."""
        config = self.peft_config[self.active_adapters[0]]
        columns = attention_mask.shape[1]
        capture = _Capture(
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

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Cognitive tokens (B, T, H) from pooled read-layer features (B, R, D_in)."""
        name = self._active or self.active_adapters[0]
        encoder = self.doubter_encoder[name]
        return encoder(features.to(next(encoder.parameters()).device, torch.float32))

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        read_positions: Optional[torch.Tensor] = None,
        pass1_features: Optional[torch.Tensor] = None,
        reuse_prefix: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Two-pass forward. `labels` mark the prompt with -100: pass 1 reads the token before the first supervised
        one, so the target never reaches pass 1. `pass1_features` (B, R, D_in), e.g. from an activation cache, skip
        pass 1. `reuse_prefix=False` recomputes every layer in pass 2 (the naive two-pass)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self._active is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if attention_mask is None and input_ids is not None:
            attention_mask = torch.ones_like(input_ids)
        if "position_ids" not in kwargs and attention_mask is not None:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        prefix_output = None
        if pass1_features is None and self.peft_config[self._active].read_position == "answer":
            raise ValueError("With read_position='answer', pass 1 reads the base's own answer: pass "
                             "`pass1_features` (e.g. from `read_answers` or an activation cache) or use `generate`.")
        if pass1_features is None:
            self._check_prompt(input_ids, attention_mask)
            if read_positions is None:
                read_positions = (
                    prompt_end_from_labels(labels) if labels is not None else last_token_positions(attention_mask)
                )
            keep = reuse_prefix and not kwargs.get("output_hidden_states")
            pass1_kwargs = {k: v for k, v in kwargs.items() if k in ("position_ids", "token_type_ids")}
            capture = self.run_pass1(input_ids, attention_mask, read_positions, keep_prefix=keep, **pass1_kwargs)
            pass1_features, prefix_output = capture.stacked(), capture.kept_output
        tokens = self.encode(pass1_features)
        first_inject = self._plans[self._active].first_inject
        with self._injecting(tokens), self._replaying(first_inject, prefix_output):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

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
        pass 2 then recomputes the whole prompt."""
        if self._active is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("inputs_embeds") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("Doubter generation takes `input_ids` (no `inputs_embeds` or `past_key_values`).")
        if attention_mask is None and input_ids is not None:
            attention_mask = torch.ones_like(input_ids)
        self._check_prompt(input_ids, attention_mask)
        if not attention_mask[:, -1].bool().all():
            raise ValueError("Doubter generation needs left padding: set `tokenizer.padding_side = 'left'`.")
        config: DoubterConfig = self.peft_config[self._active]
        plan = self._plans[self._active]
        agc = config.agc_enabled if agc is None else agc
        refresh = config.dynamic_refresh if dynamic_refresh is None else dynamic_refresh
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
        capture: _Capture,
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
        with _forward_replaced(model, shortcut):
            yield

    @contextlib.contextmanager
    def _decode_controls(self, config: DoubterConfig, agc: bool, refresh: bool, capture: _Capture) -> Iterator[None]:
        """Per decoding step: the AGC gain `floor + (1 - floor) exp(-step / tau)` and, with dynamic refresh,
        re-encoding the cognitive tokens of rows whose live read-layer state drifted from pass 1's."""
        if not agc and not refresh:
            yield
            return
        step = 0
        reference = capture.stacked()  # (B, R, D_in)
        live = _Capture(read_layers=capture.read_layers, pooling="last", positions=capture.positions,
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
