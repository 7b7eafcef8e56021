"""Family-agnostic facts about a decoder-only base model: its decoder blocks, sizes and a fingerprint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


_LAYER_LIST_NAMES = ("layers", "h", "blocks")
_FINGERPRINT_ROWS = 16
_FINGERPRINT_COLS = 8
_FINGERPRINT_TOLERANCE = 0.02


def text_config(model: nn.Module) -> Any:
    """The text (decoder) config, also for multimodal models that nest it."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ValueError(f"Cannot read the number of decoder layers from the model config ({type(config).__name__}).")


def hidden_size(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ValueError(f"Cannot read the hidden size from the model config ({type(config).__name__}).")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the `nn.ModuleList` of decoder blocks (Llama/Mistral/Qwen/Gemma: `model.layers`, GPT-2:
    `transformer.h`, multimodal: `...language_model.layers`)."""
    expected = num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES
    ]
    matches = [(name, module) for name, module in candidates if len(module) == expected]
    if len(matches) > 1:
        language = [(n, m) for n, m in matches if "language_model" in n or "text_model" in n]
        matches = language or [(n, m) for n, m in matches if "vision" not in n and "audio" not in n]
    if len(matches) != 1:
        found = ", ".join(f"{name} ({len(module)} blocks)" for name, module in candidates) or "none"
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: expected one ModuleList named "
            f"{'/'.join(_LAYER_LIST_NAMES)} with {expected} blocks; found: {found}."
        )
    return matches[0]


def fingerprint(model: nn.Module) -> dict:
    """Architecture, sizes, vocabulary and a fixed sample of the input-embedding weights."""
    config = text_config(model)
    weight = model.get_input_embeddings().weight
    vocab = weight.shape[0]
    rows = torch.linspace(0, vocab - 1, _FINGERPRINT_ROWS).round().long().to(weight.device)
    sample = weight[rows, :_FINGERPRINT_COLS].detach().float().cpu()
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "hidden_size": hidden_size(model),
        "num_layers": num_layers(model),
        "vocab_size": int(vocab),
        "embedding_sample": [round(v, 6) for v in sample.flatten().tolist()],
    }


def fingerprint_mismatch(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match). The embedding sample matches
    when its relative RMS difference is within 2%, so the same weights in bf16/fp16/int8 still match."""
    problems = [
        f"{key}: adapter has {expected.get(key)!r}, base has {actual.get(key)!r}"
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size")
        if expected.get(key) != actual.get(key)
    ]
    if not problems and expected.get("embedding_sample") is not None:
        want = torch.tensor(expected["embedding_sample"])
        got = torch.tensor(actual["embedding_sample"])
        scale = want.pow(2).mean().sqrt().clamp_min(1e-12)
        relative = ((want - got).pow(2).mean().sqrt() / scale).item()
        if want.shape != got.shape or relative > _FINGERPRINT_TOLERANCE:
            problems.append(f"embedding weights differ (relative RMS difference {relative:.3f})")
    return problems
