"""The core: the Doubter as a PEFT tuner (config, encoder and cross-attention layers, the two-pass model and its
generation), the decoder-stack discovery it relies on, and loading of the frozen base models."""

from .config import DoubterConfig
from .layer import BottleneckCrossAttention, CognitiveEncoder, DoubterLayer
from .model import DoubterModel
from .registry import DOUBTER_PEFT_TYPE, register


__all__ = [
    "DOUBTER_PEFT_TYPE",
    "BottleneckCrossAttention",
    "CognitiveEncoder",
    "DoubterConfig",
    "DoubterLayer",
    "DoubterModel",
    "register",
]
