"""`DoubterModel`: the PEFT tuner that runs a frozen causal LM in two passes.

Pass 1 runs the backbone (adapters off, no gradients) only up to the deepest layer it needs and pools the read
layers' states at the last prompt token; the encoder turns them into cognitive tokens. Pass 2 reuses pass 1's output
(and, in generation, its KV cache) below the first inject layer and recomputes from there with the gated
cross-attention added after every inject layer.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import backbone
from .capture import (
    Capture,
    LayerPlan,
    Reading,
    StopForward,
    forward_replaced,
    hidden_of,
    last_token_positions,
    position_ids_from_mask,
    prompt_end_from_labels,
)
from .config import DoubterConfig, resolve_layers
from .generation import TwoPassGenerationMixin
from .layer import CognitiveEncoder, DoubterLayer, InjectionState
from .loading import CheckedLoadingMixin
from .reading import PassOneMixin
from .registry import DOUBTER_PREFIX


_ADAPTER_CONTAINERS = ("doubter_encoder", "doubter_ca")


class DoubterModel(CheckedLoadingMixin, PassOneMixin, TwoPassGenerationMixin, BaseTuner):
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
            self._capture: Optional[Capture] = None
            self._hook_handles: list = []
            self._adapters_enabled = True
            self._gain = 1.0

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Resolve layers, check the base fingerprint and build the encoder, then let PEFT wrap the inject layers."""
        self._ensure_containers()
        self._install_load_checks()
        self._incoming = None
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
        encoder = CognitiveEncoder(config, backbone.hidden_size(model), len(plan.read))
        if not any(p.is_meta for p in encoder.parameters()):  # on the meta device with low_cpu_mem_usage=True
            embeddings = model.get_input_embeddings().weight
            encoder = encoder.to(embeddings.device, embeddings.dtype if embeddings.is_floating_point() else None)
        self.doubter_encoder[adapter_name] = encoder
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
            if getattr(config, "loaded_from_file", False) and config.check_base_fingerprint:
                raise ValueError(
                    "This Doubter's adapter_config.json records no `base_fingerprint`, so the base model it was "
                    "trained on cannot be checked. To attach it anyway, load its config, set "
                    "`check_base_fingerprint=False` and pass it as `config=` to `PeftModel.from_pretrained`."
                )
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
                capture.features[index] = capture.pool(hidden_of(output))
            if index == capture.keep_output_of:
                capture.kept_output = output
            if index == capture.stop_after:
                raise StopForward

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
        if self.active_adapters:
            self._sync_encoder_trainability(self.peft_config[self.active_adapters[0]].inference_mode)

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
        if not self._adapters_enabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return name if name in self.doubter_encoder else None

    @property
    def _layers(self) -> nn.ModuleList:
        return backbone.find_decoder_layers(self.model)[1]

    @contextlib.contextmanager
    def _capturing(self, capture: Capture) -> Iterator[Capture]:
        self._capture = capture
        try:
            yield capture
        except StopForward:
            pass
        finally:
            self._capture = None

    @contextlib.contextmanager
    def _injecting(self, tokens: torch.Tensor) -> Iterator[None]:
        self._state.set(tokens, self._gain)
        try:
            yield
        finally:
            self._state.set(None)

    @contextlib.contextmanager
    def injection_gain(self, gain: float) -> Iterator[None]:
        """Scale every injected update by `gain` inside the block (a runtime knob, like llama.cpp's per-request
        adapter scale; 0 turns the Doubter's effect off, 1 is what it was trained and calibrated with)."""
        if not math.isfinite(gain) or gain < 0:
            raise ValueError(f"The injection gain must be a finite number >= 0, got {gain!r}.")
        previous, self._gain = self._gain, float(gain)
        try:
            yield
        finally:
            self._gain = previous

    @contextlib.contextmanager
    def _replaying(self, upto: int, output: Any) -> Iterator[None]:
        """Layers below `upto` return pass 1's output of layer `upto - 1` instead of recomputing it (they are
        identical in both passes: nothing is injected below the first inject layer)."""
        layers = list(self._layers[:upto]) if output is not None else []
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.enter_context(forward_replaced(layer, lambda *args, **kwargs: output))
            yield

    def _check_prompt(self, prompt: Optional[torch.Tensor], attention_mask: torch.Tensor) -> None:
        """`prompt`: the `input_ids` (B, S) or the `inputs_embeds` (B, S, H) pass 1 reads."""
        if prompt is None:
            raise ValueError("The Doubter needs `input_ids` or `inputs_embeds` (pass 1 reads the prompt).")
        if prompt.ndim not in (2, 3) or prompt.shape[1] == 0 or not attention_mask.bool().any(-1).all():
            raise ValueError("Empty prompt: every row needs at least one non-padding token.")
        limit = getattr(backbone.text_config(self.model), "max_position_embeddings", None)
        if limit is not None and prompt.shape[1] > limit:
            raise ValueError(
                f"Input of {prompt.shape[1]} tokens is longer than the base model's context ({limit} tokens); "
                "truncate the prompt from the left."
            )

    def encode(self, reading: torch.Tensor | Reading) -> torch.Tensor:
        """Cognitive tokens (B, T, H) from pass 1's reading (or its pooled read-layer features (B, R, D_in))."""
        name = self._active or self.active_adapters[0]
        encoder = self.doubter_encoder[name]
        weight = next(encoder.parameters())
        return encoder(reading.to(weight.device, weight.dtype))

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        read_positions: Optional[torch.Tensor] = None,
        pass1_features: Optional[torch.Tensor | Reading] = None,
        prefix_hidden: Optional[torch.Tensor] = None,
        reuse_prefix: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Two-pass forward. `labels` mark the prompt with -100: pass 1 reads the token before the first supervised
        one, so the target never reaches pass 1. `pass1_features` (a `Reading`, or its features (B, R, D_in)), e.g.
        from an activation cache, skip pass 1; `prefix_hidden` (B, S, H), the states entering the first inject
        layer (`lower_layer_states`, cached), then also skips the layers below it in pass 2, where nothing is
        injected. `reuse_prefix=False` recomputes every layer in pass 2 (the naive two-pass)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self._active is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if attention_mask is None and prompt is not None:
            attention_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        if "position_ids" not in kwargs and attention_mask is not None:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        prefix_output = None
        if prefix_hidden is not None:
            if pass1_features is None:
                raise ValueError("`prefix_hidden` replaces the lower layers of pass 2 only: pass `pass1_features` too.")
            prefix_output = prefix_hidden.to(self.model.get_input_embeddings().weight.device)
        if pass1_features is None and self.peft_config[self._active].read_position == "answer":
            raise ValueError("With read_position='answer', pass 1 reads the base's own answer: pass "
                             "`pass1_features` (e.g. from `read_answers` or an activation cache) or use `generate`.")
        if pass1_features is None:
            self._check_prompt(prompt, attention_mask)
            if read_positions is None:
                read_positions = (
                    prompt_end_from_labels(labels) if labels is not None else last_token_positions(attention_mask)
                )
            keep = reuse_prefix and not kwargs.get("output_hidden_states")
            pass1_kwargs = {k: v for k, v in kwargs.items() if k in ("position_ids", "token_type_ids", "inputs_embeds")}
            capture = self.run_pass1(input_ids, attention_mask, read_positions, keep_prefix=keep, **pass1_kwargs)
            pass1_features, prefix_output = capture.stacked(), capture.kept_output
        tokens = self.encode(pass1_features)
        first_inject = self._plans[self._active].first_inject
        with self._injecting(tokens), self._replaying(first_inject, prefix_output):
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        encoder = self.doubter_encoder[self._active]
        if encoder.confidence_head is not None:
            output.confidence_log_odds = encoder.confidence_log_odds(tokens)
        return output

    def head_log_odds(self, reading: torch.Tensor | Reading) -> torch.Tensor:
        """With `confidence='head'`: the confidence's log-odds (B,) from pass 1's reading alone (no pass 2)."""
        encoder = self.doubter_encoder[self._active or self.active_adapters[0]]
        return encoder.confidence_log_odds(self.encode(reading))

