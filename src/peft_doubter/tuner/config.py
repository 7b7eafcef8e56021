"""`DoubterConfig`: the settings of a Doubter adapter, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import PeftConfig

from ..names import CONFIDENCES, DEFAULT_REFUSAL, ENCODER_TYPES, LAYER_SPEC_WORDS, POOLINGS, READ_POSITIONS
from .registry import DOUBTER_PEFT_TYPE


LayerSpec = Union[list[int], Literal["all", "late"]]


def _check_layer_spec(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value not in LAYER_SPEC_WORDS:
            raise ValueError(f"`{name}` must be a list of layer indices, 'all' or 'late', got {value!r}.")
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"`{name}` must be a non-empty list of layer indices, 'all' or 'late', got {value!r}.")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"`{name}` must contain only integers, got {value!r}.")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` contains duplicate layer indices: {value!r}.")


def resolve_layers(name: str, spec: LayerSpec, num_layers: int) -> list[int]:
    """Turn a layer spec (`'all'`, `'late'` = upper third, or a list; negative indices count from the end)
    into sorted absolute indices, with an error naming the field when an index is out of range."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "late":
        return list(range(num_layers - -(-num_layers // 3), num_layers))
    resolved = []
    for index in spec:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"`{name}` contains layer index {index}, but the base model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)."
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`{name}` names the same layer twice once negative indices are resolved: {list(spec)}.")
    return sorted(resolved)


@dataclass
class DoubterConfig(PeftConfig):
    """Configuration of a Doubter adapter.

    The Doubter reads the frozen base model's hidden states at the read layers (`target_layers`) in a first pass,
    encodes them into cognitive tokens, and injects those through a gated bottleneck cross-attention after each inject
    layer (`cross_attn_layers`) in a second pass. Field names follow the original meta-spider API.

    The defaults are the measured winner: pass 1 reads the base's own answer (`read_position='answer'`) with the
    attentive encoder, and the confidence is the encoder's head (`confidence='head'`), which `DoubterTrainer` fits on
    its own and, unless asked to, does not follow with the injection's two-pass training. The original two-pass
    Doubter is `read_position='prompt', confidence='decision'`.
    """

    target_layers: LayerSpec = field(
        default="late",
        metadata={"help": "Layers whose outputs are read in pass 1: a list of indices, 'all', or 'late' (upper third)."},
    )
    cross_attn_layers: Optional[LayerSpec] = field(
        default=None,
        metadata={"help": "Layers after which cognitive tokens are injected in pass 2. Defaults to `target_layers`."},
    )
    encoder_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "Cognitive encoder: 'selective' (one token per read layer), 'multi_token' (learned queries), "
            "'transformer' (two self-attention blocks over the layer tokens) or 'attentive' (one token per read "
            "layer plus `answer_tokens` pooled over every token of the base's own answer and its signals). "
            "Default: 'attentive' with read_position='answer', else 'selective'."
        },
    )
    pooling: str = field(
        default="last",
        metadata={
            "help": "How a read layer's prompt states become one vector: 'last' (last prompt token), 'mean' "
            "(mean over prompt tokens) or 'last_mean' (both, concatenated)."
        },
    )
    read_position: str = field(
        default="answer",
        metadata={
            "help": "Where pass 1 reads: 'prompt' (the prompt's last token, the original design) or 'answer' (the "
            "last token of the base's own greedy draft answer: in generation pass 1 drafts the answer with the "
            "adapter off, then reads prompt + draft; for a multiple-choice question the answer is the base's chosen "
            "option, read teacher-forced)."
        },
    )
    max_draft_tokens: int = field(
        default=16, metadata={"help": "With read_position='answer': longest draft answer of pass 1 in generation."}
    )
    answer_tokens: int = field(
        default=4,
        metadata={"help": "With encoder_type='attentive': cognitive tokens pooled by learned queries over the tokens "
                  "of the base's own answer (added to the one token per read layer)."},
    )
    confidence: str = field(
        default="head",
        metadata={
            "help": "The confidence the Doubter reports, ranks and is thresholded on: 'decision' (1 - the "
            "probability that pass 2 starts the refusal, at the first answer position; independent of the answer's "
            "length), 'ratio' (P(answer) / (P(answer) + P(refusal)) of the teacher-forced sequences) or 'head' (a linear "
            "unit on the mean of the encoder's cognitive tokens, trained by the confidence loss: read from pass 1 "
            "alone, no pass 2 needed to score)."
        },
    )
    num_cognitive_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of cognitive tokens. 'selective' and 'transformer' produce one per read layer (leave "
            "unset or set to that number); 'multi_token' defaults to 8."
        },
    )
    encoder_bottleneck_dim: int = field(
        default=256, metadata={"help": "Width of the encoder's per-layer projectors."}
    )
    ca_bottleneck_dim: int = field(
        default=256, metadata={"help": "Width of the cross-attention bottleneck (hidden -> b -> hidden)."}
    )
    ca_num_heads: int = field(
        default=4, metadata={"help": "Attention heads of the cross-attention (and encoder attention); divides the widths."}
    )
    ca_scale_by_rms: bool = field(
        default=True,
        metadata={
            "help": "Scale the injected update by the RMS of the residual stream at that position, so its effect "
            "does not depend on the base's residual scale (Gemma 3's late layers run at RMS 300-1300)."
        },
    )
    ca_gate_init: float = field(
        default=0.3,
        metadata={"help": "Initial injection gate g (the residual adds tanh(g) * CA); 0.3 sits in tanh's linear zone."},
    )
    encoder_gate_init: float = field(
        default=0.3, metadata={"help": "Initial per-layer encoder gate (projector output is scaled by tanh(g))."}
    )
    dynamic_gates: bool = field(
        default=False,
        metadata={
            "help": "Input-dependent encoder gates: sigmoid(w . x + b) per read layer instead of a tanh scalar "
            "(initialised to the same value as the static gate)."
        },
    )
    enable_self_correction: bool = field(
        default=False,
        metadata={"help": "Train with confirm/correct/refuse targets instead of confirm/refuse."},
    )
    correction_ratio: float = field(
        default=0.5,
        metadata={"help": "With self-correction, the fraction of wrong pass-1 answers that get a correction target."},
    )
    refusal_text: str = field(
        default=DEFAULT_REFUSAL, metadata={"help": "Canonical refusal the Doubter is trained to produce."}
    )
    agc_enabled: bool = field(
        default=False,
        metadata={"help": "Automatic gain control in generation: gates scale by floor + (1 - floor) * exp(-step / tau)."},
    )
    agc_floor: float = field(default=0.3, metadata={"help": "AGC floor in [0, 1]."})
    agc_tau: float = field(default=32.0, metadata={"help": "AGC decay constant in generated tokens (> 0)."})
    dynamic_refresh: bool = field(
        default=False,
        metadata={
            "help": "In generation, re-encode the cognitive tokens when the live read-layer state drifts from the "
            "pass-1 state (cosine similarity below `refresh_threshold`)."
        },
    )
    refresh_threshold: float = field(
        default=0.85, metadata={"help": "Cosine similarity in [-1, 1] below which dynamic refresh re-encodes."}
    )
    refresh_interval: int = field(
        default=8, metadata={"help": "Check for drift every this many generated tokens (>= 1)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the cross-attention's up-projection starts at zero, so an untrained Doubter leaves the base "
            "unchanged. False: a random (non-identity) start, PEFT's convention for tests and research."
        },
    )
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "Epsilon of the wrapper's LayerNorms."})
    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Set automatically: a fingerprint of the base model the adapter was created on."},
    )
    check_base_fingerprint: bool = field(
        default=True,
        metadata={
            "help": "Refuse to attach to a base whose fingerprint differs from `base_fingerprint`. Set to False "
            "only if you know the bases are equivalent."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Set automatically from `cross_attn_layers`: the decoder blocks wrapped for injection."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DOUBTER_PEFT_TYPE
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if str(self.task_type) not in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
            raise ValueError(f"`task_type` must be 'CAUSAL_LM' for the Doubter, got {self.task_type!r}.")
        if isinstance(self.target_layers, tuple):
            self.target_layers = list(self.target_layers)
        if isinstance(self.cross_attn_layers, tuple):
            self.cross_attn_layers = list(self.cross_attn_layers)
        _check_layer_spec("target_layers", self.target_layers)
        if self.cross_attn_layers is not None:
            _check_layer_spec("cross_attn_layers", self.cross_attn_layers)
        if self.encoder_type is None:
            self.encoder_type = "attentive" if self.read_position == "answer" else "selective"
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"`encoder_type` must be one of {ENCODER_TYPES}, got {self.encoder_type!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.read_position not in READ_POSITIONS:
            raise ValueError(f"`read_position` must be one of {READ_POSITIONS}, got {self.read_position!r}.")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"`confidence` must be one of {CONFIDENCES}, got {self.confidence!r}.")
        if self.encoder_type == "attentive" and (self.read_position != "answer" or self.pooling != "last"):
            raise ValueError("`encoder_type='attentive'` reads every token of the base's own answer: it needs "
                             "`read_position='answer'` and `pooling='last'`.")
        if self.num_cognitive_tokens is not None and (
            not isinstance(self.num_cognitive_tokens, int) or self.num_cognitive_tokens < 1
        ):
            raise ValueError(f"`num_cognitive_tokens` must be a positive integer, got {self.num_cognitive_tokens!r}.")
        for name in ("encoder_bottleneck_dim", "ca_bottleneck_dim", "ca_num_heads", "refresh_interval",
                     "max_draft_tokens", "answer_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("ca_bottleneck_dim", "encoder_bottleneck_dim"):
            if getattr(self, name) % self.ca_num_heads:
                raise ValueError(
                    f"`{name}` ({getattr(self, name)}) must be divisible by `ca_num_heads` ({self.ca_num_heads})."
                )
        for name in ("ca_gate_init", "encoder_gate_init", "agc_floor", "agc_tau", "correction_ratio",
                     "refresh_threshold", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        for name in ("ca_scale_by_rms", "dynamic_gates", "enable_self_correction", "agc_enabled", "dynamic_refresh",
                     "init_weights", "check_base_fingerprint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}.")  # noqa: TRY004
        if self.dynamic_gates and not 0.0 < math.tanh(self.encoder_gate_init) < 1.0:
            raise ValueError(f"`encoder_gate_init` must be > 0 with dynamic gates (their start is tanh of it, "
                             f"a sigmoid's value), got {self.encoder_gate_init}.")
        if not 0.0 <= self.agc_floor <= 1.0:
            raise ValueError(f"`agc_floor` must lie in [0, 1], got {self.agc_floor}.")
        if self.agc_tau <= 0:
            raise ValueError(f"`agc_tau` must be > 0, got {self.agc_tau}.")
        if not 0.0 <= self.correction_ratio <= 1.0:
            raise ValueError(f"`correction_ratio` must lie in [0, 1], got {self.correction_ratio}.")
        if not -1.0 <= self.refresh_threshold <= 1.0:
            raise ValueError(f"`refresh_threshold` is a cosine similarity in [-1, 1], got {self.refresh_threshold}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be > 0, got {self.layer_norm_eps}.")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError(f"`refusal_text` must not be empty: it is the sentence the Doubter writes when it declines "
                             f"(got {self.refusal_text!r}).")

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> DoubterConfig:
        """PEFT's loading, marking the config as read from a saved adapter (whose base fingerprint is required)."""
        config = super().from_pretrained(*args, **kwargs)
        config.loaded_from_file = True
        return config

    @classmethod
    def user_fields(cls) -> tuple[str, ...]:
        """The fields a user sets (the rest are PEFT bookkeeping or filled in when the adapter is created)."""
        automatic = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                     "base_fingerprint", "target_modules", "peft_version"}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in automatic)

    @property
    def inject_layer_spec(self) -> LayerSpec:
        """The inject-layer spec, falling back to the read layers."""
        return self.target_layers if self.cross_attn_layers is None else self.cross_attn_layers

    def token_count(self, num_read_layers: int) -> int:
        """Number of cognitive tokens the encoder produces for `num_read_layers` read layers."""
        if self.encoder_type == "multi_token":
            return self.num_cognitive_tokens or 8
        if self.encoder_type == "attentive":
            return num_read_layers + self.answer_tokens
        if self.num_cognitive_tokens not in (None, num_read_layers):
            raise ValueError(
                f"`num_cognitive_tokens` ({self.num_cognitive_tokens}) must equal the number of read layers "
                f"({num_read_layers}) for encoder_type={self.encoder_type!r}; leave it unset or use 'multi_token'."
            )
        return num_read_layers
