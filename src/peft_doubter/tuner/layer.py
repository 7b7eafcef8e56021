"""The Doubter's trainable parts: cognitive encoders, the gated bottleneck cross-attention, and the tuner layer that
wraps an inject layer's decoder block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..names import SIGNAL_LIMIT, TOKEN_SIGNALS
from .capture import Reading
from .config import DoubterConfig


@dataclass
class InjectionState:
    """What pass 2 injects, shared by the tuner and its layers: cognitive tokens (B, T, H), the AGC gain, and each
    cross-attention's keys and values of the current tokens (computed once per token set, reused every decode step)."""

    tokens: Optional[torch.Tensor] = None
    gain: float = 1.0
    token_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def set(self, tokens: Optional[torch.Tensor], gain: float = 1.0) -> None:
        self.tokens, self.gain = tokens, gain
        self.token_kv.clear()


class LayerProjector(nn.Module):
    """Per-read-layer projector: LayerNorm -> Linear(D_in -> b) -> GELU."""

    def __init__(self, in_dim: int, bottleneck: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.linear = nn.Linear(in_dim, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(self.norm(x)))


class OutputHead(nn.Module):
    """Shared output MLP of every encoder: LayerNorm(b) -> Linear(b -> H) -> GELU -> Linear(H -> H)."""

    def __init__(self, bottleneck: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(bottleneck, eps=eps)
        self.fc1 = nn.Linear(bottleneck, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(z))))


class AnswerPooling(nn.Module):
    """Learned queries attending over the tokens of the base's own answer (the `attentive` encoder). Each answer
    token is the mean of its gated per-layer projections, plus a projection of its signals (log-probability,
    entropy, top-k) and a position embedding; a learned null token is always attendable (empty answers). For a
    multiple-choice answer the null token also carries the projection of the option distribution's signals (and the
    encoder adds it to every cognitive token)."""

    def __init__(self, config: DoubterConfig, bottleneck: int) -> None:
        super().__init__()
        self.signals = nn.Sequential(nn.Linear(len(TOKEN_SIGNALS), bottleneck), nn.GELU(),
                                     nn.Linear(bottleneck, bottleneck))
        self.position = nn.Embedding(config.max_draft_tokens, bottleneck)
        self.queries = nn.Parameter(torch.randn(config.answer_tokens, bottleneck) * bottleneck**-0.5)
        self.null = nn.Parameter(torch.zeros(1, 1, bottleneck))
        self.attention = nn.MultiheadAttention(bottleneck, config.ca_num_heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, signals: torch.Tensor, mask: torch.Tensor,
                choice: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Q, b) from answer-token projections (B, L, b), their signals (B, L, S) and mask (B, L), and the
        projection of the option distribution (B, b; `choice_projection`) of multiple-choice answers."""
        batch, length, _ = tokens.shape
        positions = torch.arange(length, device=tokens.device).clamp_max(self.position.num_embeddings - 1)
        keys = tokens + self.signals(signals.clamp(-SIGNAL_LIMIT, SIGNAL_LIMIT)) + self.position(positions)
        null = self.null.expand(batch, -1, -1)
        if choice is not None:
            null = null + choice[:, None]
        keys = torch.cat([null, keys], dim=1)  # (B, 1 + L, b)
        ignore = torch.cat([mask.new_zeros(batch, 1), ~mask.bool()], dim=1)  # True = not attended
        queries = self.queries[None].expand(batch, -1, -1)
        pooled, _ = self.attention(queries, keys, keys, key_padding_mask=ignore, need_weights=False)
        return pooled

    def choice_projection(self, choice: torch.Tensor) -> torch.Tensor:
        """(B, b): the signal projection of each row's option distribution (B, S); zero in NaN rows (no options)."""
        projected = self.signals(choice.nan_to_num().clamp(-SIGNAL_LIMIT, SIGNAL_LIMIT))
        return torch.where(~choice[:, :1].isnan(), projected, torch.zeros_like(projected))


class CognitiveEncoder(nn.Module):
    """Turns pass 1's reading (pooled read-layer features (B, R, D_in), and for `attentive` the answer's tokens)
    into cognitive tokens (B, T, H).

    All encoder types share the gated per-layer projectors and the output head; `transformer` adds two self-attention
    blocks over the R layer tokens, `multi_token` lets T learned queries attend over them, `attentive` adds
    `answer_tokens` tokens pooled by learned queries over every token of the base's own answer (`AnswerPooling`).
    """

    def __init__(self, config: DoubterConfig, hidden_size: int, num_read_layers: int) -> None:
        super().__init__()
        in_dim = hidden_size * (2 if config.pooling == "last_mean" else 1)
        b, eps = config.encoder_bottleneck_dim, config.layer_norm_eps
        self.encoder_type = config.encoder_type
        self.num_tokens = config.token_count(num_read_layers)
        self.projectors = nn.ModuleList(LayerProjector(in_dim, b, eps) for _ in range(num_read_layers))
        if config.dynamic_gates:
            self.gate_nets = nn.ModuleList(nn.Linear(in_dim, 1) for _ in range(num_read_layers))
            initial = math.tanh(config.encoder_gate_init)
            for net in self.gate_nets:
                nn.init.zeros_(net.weight)
                nn.init.constant_(net.bias, math.log(initial / (1 - initial)))
        else:
            self.gates = nn.Parameter(torch.full((num_read_layers,), float(config.encoder_gate_init)))
        if config.encoder_type == "transformer":
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    b, config.ca_num_heads, dim_feedforward=4 * b, dropout=0.0, activation="gelu",
                    layer_norm_eps=eps, batch_first=True, norm_first=True,
                )
                for _ in range(2)
            )
        elif config.encoder_type == "multi_token":
            self.queries = nn.Parameter(torch.randn(self.num_tokens, b) * b**-0.5)
            self.query_attn = nn.MultiheadAttention(b, config.ca_num_heads, batch_first=True)
        elif config.encoder_type == "attentive":
            self.answer_pooling = AnswerPooling(config, b)
        self.output = OutputHead(b, hidden_size, eps)
        self.output_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.confidence_head = nn.Linear(hidden_size, 1) if config.confidence == "head" else None

    def confidence_log_odds(self, tokens: torch.Tensor) -> torch.Tensor:
        """With `confidence='head'`: the confidence's log-odds (B,) from the cognitive tokens (B, T, H)."""
        if self.confidence_head is None:
            raise ValueError("This Doubter has no confidence head: it was built with confidence != 'head'.")
        return self.confidence_head(tokens.mean(1)).squeeze(-1)

    def layer_gates(self, features: torch.Tensor) -> torch.Tensor:
        """Per-layer encoder gate values, (B, R, 1)."""
        if hasattr(self, "gate_nets"):
            return torch.cat([torch.sigmoid(net(features[:, r])) for r, net in enumerate(self.gate_nets)], dim=1)[
                ..., None
            ]
        return torch.tanh(self.gates)[None, :, None].expand(features.shape[0], -1, -1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Gated per-layer projections, (B, R, D_in) -> (B, R, b)."""
        projected = torch.stack([proj(features[:, r]) for r, proj in enumerate(self.projectors)], dim=1)
        return projected * self.layer_gates(features)

    def forward(self, reading: torch.Tensor | Reading) -> torch.Tensor:
        features = reading.features if isinstance(reading, Reading) else reading
        z = self.project(features)  # (B, R, b)
        if self.encoder_type == "attentive":
            if not isinstance(reading, Reading) or reading.answer_states is None:
                raise ValueError("The `attentive` encoder reads the base's own answer: pass a `Reading` with "
                                 "`answer_states` (read_position='answer').")
            batch, length = reading.answer_states.shape[:2]
            per_layer = self.project(reading.answer_states.flatten(0, 1))  # (B * L, R, b)
            tokens = per_layer.mean(1).view(batch, length, -1)  # (B, L, b)
            choice = None if reading.choice_signals is None else self.answer_pooling.choice_projection(
                reading.choice_signals)  # (B, b)
            pooled = self.answer_pooling(tokens, reading.token_signals, reading.answer_mask, choice)  # (B, Q, b)
            z = torch.cat([z, pooled], dim=1)  # (B, R + Q, b)
            if choice is not None:  # multiple choice: every token sees the option distribution
                z = z + choice[:, None]
        elif self.encoder_type == "transformer":
            for block in self.blocks:
                z = block(z)
        elif self.encoder_type == "multi_token":
            queries = self.queries[None].expand(z.shape[0], -1, -1)  # (B, T, b)
            z, _ = self.query_attn(queries, z, z, need_weights=False)
        return self.output_norm(self.output(z))  # (B, T, H)


class BottleneckCrossAttention(nn.Module):
    """Gated cross-attention from the residual stream to the cognitive tokens, through a bottleneck:

    `h + gain * tanh(gate) * up(MHA(q=q(down(LN(h))), k=k(c), v=v(c)) + token_preference) * rms(h)`,
    the last factor (the residual's root-mean-square per position) only with `ca_scale_by_rms`.
    """

    def __init__(self, config: DoubterConfig, hidden_size: int, num_tokens: int) -> None:
        super().__init__()
        b = config.ca_bottleneck_dim
        self.num_heads = config.ca_num_heads
        self.scale_by_rms = config.ca_scale_by_rms
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.down_proj = nn.Linear(hidden_size, b, bias=False)
        self.q_proj = nn.Linear(b, b, bias=False)
        self.k_proj = nn.Linear(hidden_size, b, bias=False)
        self.v_proj = nn.Linear(hidden_size, b, bias=False)
        self.up_proj = nn.Linear(b, hidden_size, bias=False)
        if config.init_weights:
            nn.init.zeros_(self.up_proj.weight)  # an untrained Doubter leaves the base unchanged (LoRA's B = 0)
        self.token_preference = nn.Parameter(torch.zeros(num_tokens))
        self.gate = nn.Parameter(torch.tensor([float(config.ca_gate_init)]))

    def token_keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the cognitive tokens, each (B, nh, T, hd)."""
        batch, count, _ = tokens.shape
        k = self.k_proj(tokens).view(batch, count, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(tokens).view(batch, count, self.num_heads, -1).transpose(1, 2)
        return k, v

    def attend(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The un-gated update `up(attn)`, (B, S, H)."""
        batch, seq, _ = hidden.shape
        q = self.q_proj(self.down_proj(self.norm(hidden)))  # (B, S, b)
        q = q.view(batch, seq, self.num_heads, -1).transpose(1, 2)  # (B, nh, S, hd)
        scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1]) + self.token_preference  # (B, nh, S, T)
        out = scores.softmax(dim=-1) @ values  # (B, nh, S, hd)
        return self.up_proj(out.transpose(1, 2).reshape(batch, seq, -1))  # (B, S, H)

    def forward(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        gain: float = 1.0,
        keys_values: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        dtype = self.down_proj.weight.dtype
        keys, values = keys_values if keys_values is not None else self.token_keys_values(tokens.to(dtype))
        update = self.attend(hidden.to(dtype), keys, values)
        if self.scale_by_rms:
            # + 1e-12: finite gradients at all-zero positions (the padding of cached lower-layer states)
            update = update * (hidden.to(dtype).pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()
        return hidden + (gain * torch.tanh(self.gate) * update).to(hidden.dtype)


class DoubterLayer(nn.Module, BaseTunerLayer):
    """Wraps one decoder block; after the block runs, adds the active adapter's cross-attention to its output."""

    adapter_layer_names = ("doubter_ca",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: DoubterConfig,
        hidden_size: int,
        num_tokens: int,
        state: InjectionState,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.doubter_ca = nn.ModuleDict({})
        self._state = state
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_tokens)

    def update_layer(self, adapter_name: str, config: DoubterConfig, num_tokens: int) -> None:
        self.doubter_ca[adapter_name] = BottleneckCrossAttention(config, self.hidden_size, num_tokens)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT places an adapter by its base layer's `weight`, which a decoder block lacks: use the block's first
        floating-point parameter instead (its device and dtype). Meta-device adapters (low_cpu_mem_usage) stay."""
        weight = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        attention = self.doubter_ca[adapter_name]
        if weight is None or any(p.is_meta for p in attention.parameters()):
            return
        self.doubter_ca[adapter_name] = attention.to(device or weight.device, weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        adapters = self.active_adapters
        if self.disable_adapters or self._state.tokens is None or not adapters or adapters[0] not in self.doubter_ca:
            return output
        adapter = adapters[0]
        hidden = output[0] if isinstance(output, tuple) else output
        attention = self.doubter_ca[adapter]
        state = self._state
        if id(attention) not in state.token_kv:
            state.token_kv[id(attention)] = attention.token_keys_values(state.tokens.to(attention.gate.dtype))
        injected = attention(hidden, state.tokens, state.gain, state.token_kv[id(attention)])
        return (injected, *output[1:]) if isinstance(output, tuple) else injected

    def __repr__(self) -> str:
        return "doubter." + super().__repr__()
