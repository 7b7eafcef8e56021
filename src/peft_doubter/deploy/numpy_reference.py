"""Pure-numpy reference of the Doubter's forward pass (float64 inside): the oracle for the llama.cpp port.

Written from the math, not from the PyTorch modules. Weights are the sidecar's canonical-name dict and metadata
(`peft_doubter.deploy.sidecar.read_sidecar` returns both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..names import SIGNAL_LIMIT
from .sidecar_format import TRANSFORMER_BLOCKS, expected_shapes


Weights = Mapping[str, np.ndarray]


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _w(weights: Weights, name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float64)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int,
              preference: np.ndarray | None = None) -> np.ndarray:
    """Multi-head softmax(q k^T / sqrt(hd) + preference) v; q (S, b), k and v (T, b) -> (S, b)."""
    seq, width = q.shape
    hd = width // num_heads
    qh = q.reshape(seq, num_heads, hd).transpose(1, 0, 2)  # (nh, S, hd)
    kh = k.reshape(len(k), num_heads, hd).transpose(1, 0, 2)  # (nh, T, hd)
    vh = v.reshape(len(v), num_heads, hd).transpose(1, 0, 2)  # (nh, T, hd)
    scores = qh @ kh.transpose(0, 2, 1) / math.sqrt(hd)  # (nh, S, T)
    if preference is not None:
        scores = scores + preference
    return (softmax(scores) @ vh).transpose(1, 0, 2).reshape(seq, width)  # (S, b)


def multihead_attention(weights: Weights, prefix: str, query: np.ndarray, kv: np.ndarray,
                        num_heads: int) -> np.ndarray:
    """torch.nn.MultiheadAttention with packed `in_proj_weight`/`in_proj_bias` and `out_proj`."""
    w, b = _w(weights, prefix + "in_proj_weight"), _w(weights, prefix + "in_proj_bias")
    wq, wk, wv = np.split(w, 3)
    bq, bk, bv = np.split(b, 3)
    out = attention(query @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv, num_heads)
    return out @ _w(weights, prefix + "out_proj.weight").T + _w(weights, prefix + "out_proj.bias")


def pool(hidden: Sequence[np.ndarray], pooling: str) -> np.ndarray:
    """Pooled features (R, D_in) from each read layer's prompt hidden states (S, H)."""
    rows = []
    for h in hidden:
        h = np.asarray(h, dtype=np.float64)
        last, mean = h[-1], h.mean(0)
        rows.append({"last": last, "mean": mean, "last_mean": np.concatenate([last, mean])}[pooling])
    return np.stack(rows)


def _project(weights: Weights, metadata: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """Gated per-read-layer projections: (R, D_in) -> (R, b)."""
    eps = float(metadata["layer_norm_eps"])
    z = []
    for r in range(len(metadata["read_layers"])):
        p = f"encoder.projectors.{r}."
        h = layer_norm(x[r], _w(weights, p + "norm.weight"), _w(weights, p + "norm.bias"), eps)
        h = gelu(_w(weights, p + "linear.weight") @ h + _w(weights, p + "linear.bias"))
        if metadata["dynamic_gates"]:
            net = f"encoder.gate_nets.{r}."
            logit = _w(weights, net + "weight")[0] @ x[r] + _w(weights, net + "bias")[0]
            gate = 1.0 / (1.0 + math.exp(-logit))
        else:
            gate = math.tanh(_w(weights, "encoder.gates")[r])
        z.append(gate * h)
    return np.stack(z)


def pool_answer(weights: Weights, metadata: Mapping[str, Any], answer_states: np.ndarray,
                token_signals: np.ndarray) -> np.ndarray:
    """The `attentive` encoder's answer tokens (Q, b): learned queries attending over a null token and each answer
    token's mean gated projection of its read-layer states (each divided by its RMS) plus a projection of its
    signals (clipped to +-SIGNAL_LIMIT) and a position embedding. `answer_states` (L, R, H) are the raw states,
    `token_signals` (L, S); L may be 0."""
    p = "encoder.answer_pooling."
    states = np.asarray(answer_states, dtype=np.float64)
    signals = np.clip(np.asarray(token_signals, dtype=np.float64), -SIGNAL_LIMIT, SIGNAL_LIMIT)
    keys = [_w(weights, p + "null").reshape(1, -1)]
    if len(states):
        states = states / np.maximum(np.sqrt((states**2).mean(-1, keepdims=True)), 1e-6)
        tokens = np.stack([_project(weights, metadata, state).mean(0) for state in states])  # (L, b)
        hidden = gelu(signals @ _w(weights, p + "signals.0.weight").T + _w(weights, p + "signals.0.bias"))
        position = _w(weights, p + "position.weight")
        rows = np.minimum(np.arange(len(states)), len(position) - 1)
        keys.append(tokens + hidden @ _w(weights, p + "signals.2.weight").T + _w(weights, p + "signals.2.bias")
                    + position[rows])
    return multihead_attention(weights, p + "attention.", _w(weights, p + "queries"), np.concatenate(keys),
                               int(metadata["ca_num_heads"]))


def encode(weights: Weights, metadata: Mapping[str, Any], features: np.ndarray,
           answer_states: np.ndarray | None = None, token_signals: np.ndarray | None = None) -> np.ndarray:
    """Cognitive encoder: pooled features (R, D_in) -> cognitive tokens (T, H); the `attentive` encoder also reads
    the answer's raw states (L, R, H) and signals (L, S) (`pool_answer`)."""
    eps, heads = float(metadata["layer_norm_eps"]), int(metadata["ca_num_heads"])
    z = _project(weights, metadata, np.asarray(features, dtype=np.float64))  # (R, b)
    if metadata["encoder_type"] == "transformer":
        for k in range(TRANSFORMER_BLOCKS):
            p = f"encoder.blocks.{k}."
            y = layer_norm(z, _w(weights, p + "norm1.weight"), _w(weights, p + "norm1.bias"), eps)
            z = z + multihead_attention(weights, p + "self_attn.", y, y, heads)
            y = layer_norm(z, _w(weights, p + "norm2.weight"), _w(weights, p + "norm2.bias"), eps)
            y = gelu(y @ _w(weights, p + "linear1.weight").T + _w(weights, p + "linear1.bias"))
            z = z + y @ _w(weights, p + "linear2.weight").T + _w(weights, p + "linear2.bias")
    elif metadata["encoder_type"] == "multi_token":
        z = multihead_attention(weights, "encoder.query_attn.", _w(weights, "encoder.queries"), z, heads)  # (T, b)
    elif metadata["encoder_type"] == "attentive":
        if answer_states is None or token_signals is None:
            raise ValueError("The attentive encoder reads the answer: pass answer_states and token_signals.")
        z = np.concatenate([z, pool_answer(weights, metadata, answer_states, token_signals)])  # (R + Q, b)
    c = layer_norm(z, _w(weights, "encoder.output.norm.weight"), _w(weights, "encoder.output.norm.bias"), eps)
    c = gelu(c @ _w(weights, "encoder.output.fc1.weight").T + _w(weights, "encoder.output.fc1.bias"))
    c = c @ _w(weights, "encoder.output.fc2.weight").T + _w(weights, "encoder.output.fc2.bias")
    return layer_norm(c, _w(weights, "encoder.output_norm.weight"), _w(weights, "encoder.output_norm.bias"), eps)


def head_log_odds(weights: Weights, tokens: np.ndarray) -> float:
    """`confidence='head'`: the confidence's log-odds from the cognitive tokens (T, H), w . mean(tokens) + b."""
    mean = np.asarray(tokens, dtype=np.float64).mean(0)
    weight, bias = _w(weights, "encoder.confidence_head.weight")[0], _w(weights, "encoder.confidence_head.bias")[0]
    return float(weight @ mean + bias)


def agc_alpha(metadata: Mapping[str, Any], step: int) -> float:
    """AGC gain after `step` generated tokens (1 when AGC is off)."""
    if not metadata["agc_enabled"]:
        return 1.0
    floor = float(metadata["agc_floor"])
    return floor + (1.0 - floor) * math.exp(-step / float(metadata["agc_tau"]))


def cross_attention(weights: Weights, metadata: Mapping[str, Any], layer: int, hidden: np.ndarray,
                    tokens: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Inject layer `layer`: h (S, H) -> h + alpha * tanh(gate) * up(MHA(q(down(LN(h))), k(C), v(C))), the update
    multiplied by rms(h) = sqrt(mean_H(h^2)) per position (no epsilon) when `metadata["ca_scale_by_rms"]`."""
    p = f"ca.{layer}."
    h, c = np.asarray(hidden, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    u = layer_norm(h, _w(weights, p + "norm.weight"), _w(weights, p + "norm.bias"), float(metadata["layer_norm_eps"]))
    q = u @ _w(weights, p + "down_proj.weight").T @ _w(weights, p + "q_proj.weight").T  # (S, b)
    k, v = c @ _w(weights, p + "k_proj.weight").T, c @ _w(weights, p + "v_proj.weight").T  # (T, b)
    o = attention(q, k, v, int(metadata["ca_num_heads"]), _w(weights, p + "token_preference"))
    update = alpha * math.tanh(_w(weights, p + "gate")[0]) * (o @ _w(weights, p + "up_proj.weight").T)
    if metadata["ca_scale_by_rms"]:
        update = update * np.sqrt(np.mean(h * h, axis=-1, keepdims=True))
    return h + update


def random_weights(metadata: Mapping[str, Any], seed: int = 0, gate: float = 0.05) -> dict[str, np.ndarray]:
    """Random float32 weights with the sidecar's shapes (for parity tests and smoke runs): unit-scale matrices,
    LayerNorm weights near 1, and every gate at `gate`."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(metadata).items():
        fan_in = shape[-1] if len(shape) == 2 else 1
        value = rng.standard_normal(shape) / math.sqrt(fan_in)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        if name == "encoder.gates" or name.endswith(".gate"):
            value = np.full(shape, gate)
        weights[name] = value.astype(np.float32)
    return weights
