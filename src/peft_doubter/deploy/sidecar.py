"""Write and read the Doubter's GGUF sidecar (the weights llama.cpp loads next to the base model's GGUF)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..names import POOLINGS, READ_POSITIONS, SIDECAR_CONFIDENCES, SIDECAR_FILE
from ..paths import fetch_file
from .sidecar_format import (
    ADAPTER_TYPE,
    ANSWER_READING_POOLING,
    GENERAL_TYPE,
    KEY_ADAPTER_TYPE,
    KEY_GENERAL_ARCHITECTURE,
    KEY_GENERAL_TYPE,
    LEGACY_DEFAULTS,
    META_KEYS,
    SIDECAR_ENCODERS,
    conditional_keys,
    expected_shapes,
    llama_cpp_arch,
    to_canonical_name,
    to_gguf_name,
)


def normalize_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the sidecar metadata and return it with plain Python types, the effective
    `num_cognitive_tokens` and `base_fingerprint` (any JSON value) as JSON text, or absent."""
    known = {m.field for m in META_KEYS}
    unknown = sorted(set(metadata) - known)
    if unknown:
        raise ValueError(f"Unknown sidecar metadata fields {unknown}; known: {sorted(known)}.")
    conditional = conditional_keys(metadata.get("read_position"), metadata.get("encoder_type"))
    required = {m.field for m in META_KEYS if m.required} - {"num_cognitive_tokens"} | set(conditional)
    missing = sorted(required - set(metadata))
    if missing:
        raise ValueError(f"Missing sidecar metadata fields {missing}.")
    meta: dict[str, Any] = {}
    for field in ("n_embd", "n_layer", "encoder_bottleneck_dim", "ca_bottleneck_dim", "ca_num_heads",
                  "refresh_interval", *conditional):
        value = metadata[field]
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise ValueError(f"`{field}` must be a positive integer, got {value!r}.")
        meta[field] = int(value)
    for field in ("layer_norm_eps", "agc_floor", "agc_tau", "refresh_threshold"):
        meta[field] = float(metadata[field])
    for field in ("dynamic_gates", "agc_enabled", "dynamic_refresh", "ca_scale_by_rms"):
        if not isinstance(metadata[field], (bool, np.bool_)):
            raise ValueError(f"`{field}` must be a bool, got {metadata[field]!r}.")  # noqa: TRY004 (a bad value in a file)
        meta[field] = bool(metadata[field])
    for field in ("base_architecture", "encoder_type", "pooling", "refusal_text", "confidence", "read_position"):
        if not isinstance(metadata[field], str) or not metadata[field]:
            raise ValueError(f"`{field}` must be a non-empty string, got {metadata[field]!r}.")
        meta[field] = metadata[field]
    llama_cpp_arch(meta["base_architecture"])
    if meta["encoder_type"] not in SIDECAR_ENCODERS:
        raise ValueError(f"`encoder_type` must be one of {SIDECAR_ENCODERS} in a sidecar (llama.cpp implements "
                         f"those), got {meta['encoder_type']!r}.")
    if meta["confidence"] not in SIDECAR_CONFIDENCES:
        raise ValueError(f"`confidence` must be one of {SIDECAR_CONFIDENCES} in a sidecar, "
                         f"got {meta['confidence']!r}.")
    if meta["pooling"] not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}, got {meta['pooling']!r}.")
    if meta["read_position"] not in READ_POSITIONS:
        raise ValueError(f"`read_position` must be one of {READ_POSITIONS}, got {meta['read_position']!r}.")
    if meta["read_position"] == "answer" and meta["pooling"] != ANSWER_READING_POOLING:
        raise ValueError(f"A sidecar that reads the answer needs pooling={ANSWER_READING_POOLING!r} (llama.cpp reads "
                         f"the answer as its draft goes), got {meta['pooling']!r}.")
    if meta["encoder_type"] == "attentive" and meta["read_position"] != "answer":
        raise ValueError("encoder_type='attentive' pools the answer's tokens: it needs read_position='answer'.")
    for field in ("read_layers", "inject_layers"):
        layers = [int(i) for i in metadata[field]]
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < meta["n_layer"] for i in layers):
            raise ValueError(f"`{field}` must be a non-empty list of distinct layers in [0, {meta['n_layer']}), "
                             f"got {list(metadata[field])!r}.")
        meta[field] = layers
    n_read, tokens = len(meta["read_layers"]), metadata.get("num_cognitive_tokens")
    if meta["encoder_type"] == "attentive":
        if tokens not in (None, n_read + meta["answer_tokens"]):
            raise ValueError(f"`num_cognitive_tokens` ({tokens}) must equal the read layers plus `answer_tokens` "
                             f"({n_read + meta['answer_tokens']}) for encoder_type='attentive'.")
        meta["num_cognitive_tokens"] = n_read + meta["answer_tokens"]
    elif meta["encoder_type"] == "multi_token":
        if tokens is None or int(tokens) < 1:
            raise ValueError(f"`num_cognitive_tokens` must be a positive integer for multi_token, got {tokens!r}.")
        meta["num_cognitive_tokens"] = int(tokens)
    else:
        if tokens not in (None, n_read):
            raise ValueError(f"`num_cognitive_tokens` ({tokens}) must equal the number of read layers ({n_read}) "
                             f"for encoder_type={meta['encoder_type']!r}.")
        meta["num_cognitive_tokens"] = n_read
    for field in ("encoder_bottleneck_dim", "ca_bottleneck_dim"):
        if meta[field] % meta["ca_num_heads"]:
            raise ValueError(f"`{field}` ({meta[field]}) must be divisible by `ca_num_heads` "
                             f"({meta['ca_num_heads']}).")
    if not meta["layer_norm_eps"] > 0 or not meta["agc_tau"] > 0:
        raise ValueError("`layer_norm_eps` and `agc_tau` must be > 0.")
    if not 0.0 <= meta["agc_floor"] <= 1.0:
        raise ValueError(f"`agc_floor` must lie in [0, 1], got {meta['agc_floor']}.")
    if not -1.0 <= meta["refresh_threshold"] <= 1.0:
        raise ValueError(f"`refresh_threshold` must lie in [-1, 1], got {meta['refresh_threshold']}.")
    fingerprint = metadata.get("base_fingerprint")
    if fingerprint is not None:
        meta["base_fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    return meta


def _check_tensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    shapes = expected_shapes(meta)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"Sidecar tensors do not match the configuration: missing {missing}, "
                         f"unexpected {unexpected}.")
    wrong = {n: (tuple(np.shape(t)), shapes[n]) for n, t in tensors.items() if tuple(np.shape(t)) != shapes[n]}
    if wrong:
        raise ValueError("Sidecar tensors with wrong shapes (got, expected): "
                         + ", ".join(f"{n}: {g} vs {e}" for n, (g, e) in sorted(wrong.items())))


def write_sidecar(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
    """Validate `tensors` (canonical names -> float arrays) against `metadata` and write the GGUF sidecar."""
    import gguf

    meta = normalize_metadata(metadata)
    _check_tensors(tensors, meta)
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise ValueError(f"Tensor `{name}` must hold finite floating-point values (dtype {array.dtype}).")
        arrays[name] = np.ascontiguousarray(array, dtype=np.float32)

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch=llama_cpp_arch(meta["base_architecture"]))
    try:
        writer.add_string(KEY_GENERAL_TYPE, GENERAL_TYPE)
        writer.add_string(KEY_ADAPTER_TYPE, ADAPTER_TYPE)
        for m in META_KEYS:
            if m.field not in meta:
                continue
            value = meta[m.field]
            if m.kind == "u32":
                writer.add_uint32(m.key, value)
            elif m.kind == "f32":
                writer.add_float32(m.key, value)
            elif m.kind == "bool":
                writer.add_bool(m.key, value)
            elif m.kind == "str":
                writer.add_string(m.key, value)
            else:
                writer.add_key_value(m.key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        for name in sorted(arrays):
            writer.add_tensor(to_gguf_name(name), arrays[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, path)
    return path


def _field_value(field: Any, kind: str, key: str) -> Any:
    import gguf

    types = {"u32": [gguf.GGUFValueType.UINT32], "f32": [gguf.GGUFValueType.FLOAT32],
             "bool": [gguf.GGUFValueType.BOOL], "str": [gguf.GGUFValueType.STRING],
             "i32[]": [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]}[kind]
    if list(field.types) != types:
        raise ValueError(f"Sidecar key `{key}` has type {[t.name for t in field.types]}, expected {kind}.")
    value = field.contents()
    return [int(v) for v in value] if kind == "i32[]" else value


def read_sidecar(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and validate a Doubter sidecar: (canonical name -> float32 array, metadata).

    Raises `ValueError` naming the problem for files that are not GGUF, are truncated, are another adapter type or
    do not hold exactly the tensors their metadata requires.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No sidecar at {path}.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises assorted errors on malformed input
        raise ValueError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}).") from err

    def get(key: str, kind: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            raise ValueError(f"{path}: missing sidecar key `{key}`.")
        return _field_value(field, kind, key)

    general_type = get(KEY_GENERAL_TYPE, "str")
    if general_type != GENERAL_TYPE:
        raise ValueError(f"{path}: `{KEY_GENERAL_TYPE}` is {general_type!r}, expected {GENERAL_TYPE!r}.")
    adapter_type = get(KEY_ADAPTER_TYPE, "str")
    if adapter_type != ADAPTER_TYPE:
        raise ValueError(f"{path}: `{KEY_ADAPTER_TYPE}` is {adapter_type!r}, expected {ADAPTER_TYPE!r} "
                         "(another adapter type, not a Doubter sidecar).")
    present = {m.field for m in META_KEYS if reader.get_field(m.key) is not None}
    raw = {m.field: get(m.key, m.kind) for m in META_KEYS
           if m.field in present or (m.required and m.field not in LEGACY_DEFAULTS)}
    raw = {**LEGACY_DEFAULTS, **raw}  # keys that older sidecars lack
    if "base_fingerprint" in raw:
        try:
            raw["base_fingerprint"] = json.loads(raw["base_fingerprint"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: `base_fingerprint` is not JSON ({err}).") from None
    meta = normalize_metadata(raw)
    arch = get(KEY_GENERAL_ARCHITECTURE, "str")
    if arch != llama_cpp_arch(meta["base_architecture"]):
        raise ValueError(f"{path}: `{KEY_GENERAL_ARCHITECTURE}` {arch!r} does not match `base_architecture` "
                         f"{meta['base_architecture']!r}.")

    size = path.stat().st_size
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{path}: tensor `{tensor.name}` has type {tensor.tensor_type.name}, expected F32.")
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path}: tensor `{tensor.name}` lies beyond the end of the file (truncated?).")
        try:
            name = to_canonical_name(tensor.name)
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor `{tensor.name}`.") from None
        tensors[name] = np.array(tensor.data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if not np.isfinite(tensors[name]).all():
            raise ValueError(f"{path}: tensor `{tensor.name}` holds NaN or infinite values (a damaged or diverged "
                             "adapter).")
    try:
        _check_tensors(tensors, meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if "base_fingerprint" in raw:
        meta["base_fingerprint"] = raw["base_fingerprint"]
    return tensors, meta


def not_exportable(config: Any, multiple_choice: bool = False) -> str | None:
    """Why a Doubter with this `DoubterConfig` (trained on `multiple_choice` questions) has no llama.cpp
    implementation, or None when it exports."""
    if config.confidence not in SIDECAR_CONFIDENCES:
        return (f"confidence={config.confidence!r} has no llama.cpp implementation yet: the sidecar holds Doubters "
                f"with the confidences {SIDECAR_CONFIDENCES}.")
    if config.read_position == "answer" and config.pooling != ANSWER_READING_POOLING:
        return (f"read_position='answer' with pooling={config.pooling!r} has no llama.cpp implementation: llama.cpp "
                f"reads the answer as its draft goes, with pooling={ANSWER_READING_POOLING!r}.")
    if config.read_position == "answer" and multiple_choice:
        return ("read_position='answer' on multiple-choice questions has no llama.cpp implementation: the Doubter "
                "reads the chosen option and the option scores, while llama.cpp drafts an open answer. Serve it "
                "with PyTorch (`peft-doubter serve --backend pytorch`).")
    return None


def doubter_tensors(peft_model: Any, adapter_name: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The canonical tensors and sidecar metadata of a Doubter adapter attached to its base (a `PeftModel`)."""
    from ..tuner import backbone
    from ..tuner.layer import DoubterLayer

    adapter = adapter_name or peft_model.active_adapter
    doubter = peft_model.base_model
    config = peft_model.peft_config[adapter]
    reason = not_exportable(config)
    if reason:
        raise ValueError(reason)
    plan = doubter._plans[adapter]
    tensors = {f"encoder.{k}": v.detach().float().cpu().numpy()
               for k, v in doubter.doubter_encoder[adapter].state_dict().items()}
    _, layers = backbone.find_decoder_layers(doubter.model)
    for index, layer in enumerate(layers):
        if isinstance(layer, DoubterLayer) and adapter in layer.doubter_ca:
            tensors.update({f"ca.{index}.{k}": v.detach().float().cpu().numpy()
                            for k, v in layer.doubter_ca[adapter].state_dict().items()})
    metadata = {
        "base_architecture": config.base_fingerprint["model_type"],
        "n_embd": backbone.hidden_size(doubter.model),
        "n_layer": backbone.num_layers(doubter.model),
        "read_layers": plan.read,
        "inject_layers": plan.inject,
        "num_cognitive_tokens": doubter.doubter_encoder[adapter].num_tokens,
        "base_fingerprint": config.base_fingerprint,
        **{name: getattr(config, name) for name in (
            "encoder_type", "pooling", "encoder_bottleneck_dim", "ca_bottleneck_dim", "ca_num_heads", "ca_scale_by_rms",
            "dynamic_gates", "layer_norm_eps", "agc_enabled", "agc_floor", "agc_tau", "dynamic_refresh",
            "refresh_threshold", "refresh_interval", "refusal_text", "confidence", "read_position")},
    }
    metadata.update({name: getattr(config, name) for name in conditional_keys(config.read_position,
                                                                              config.encoder_type)})
    return tensors, metadata


def download_sidecar(repo_id_or_path: str | os.PathLike, revision: str | None = None, *,
                     token: str | None = None) -> Path:
    """Local path of a Doubter's GGUF sidecar for `llama-doubter --sidecar`: a `.gguf` file as is, a run or repo
    directory's sidecar, or that file downloaded from a Hub repo."""
    path = Path(repo_id_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No sidecar at {path}.")
        return path
    return fetch_file(repo_id_or_path, SIDECAR_FILE, revision, token)
