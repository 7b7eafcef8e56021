"""Tiny randomly initialised causal LMs of several families (widths >= 64), built without any download."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)


# The original two-pass Doubter (prompt reading, selective encoder, decision confidence; `DoubterConfig`'s defaults
# are the head-only Doubter reading the answer): what the tests of the two-pass mechanics build.
TWO_PASS = {"read_position": "prompt", "encoder_type": "selective", "confidence": "decision"}
VOCAB = 128
LAYERS = 4
_COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _causal_lm(config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(config)


def llama():
    return _causal_lm(LlamaConfig(**_COMMON))


def mistral():
    return _causal_lm(MistralConfig(**_COMMON, sliding_window=None))


def qwen2():
    return _causal_lm(Qwen2Config(**_COMMON))


def qwen3():
    return _causal_lm(Qwen3Config(**_COMMON, head_dim=16))


def gemma2():
    # a sliding window of 6 tokens makes prompts longer than the window exercise the sliding-window KV cache
    return _causal_lm(Gemma2Config(**_COMMON, head_dim=16, sliding_window=6))


def gemma3():
    return _causal_lm(Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=6))


def gpt2():
    return _causal_lm(
        GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
    )


def gemma3_multimodal():
    """Gemma 3 with a vision tower: the decoder sits under `model.language_model`."""
    text = Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=6)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                num_attention_heads=4, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "gpt2": gpt2,
    "gemma3-multimodal": gemma3_multimodal,
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()
