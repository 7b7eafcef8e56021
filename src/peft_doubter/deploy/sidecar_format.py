"""The GGUF sidecar format of the Doubter: every key name, tensor name and expected shape, in one place.

The llama.cpp loader reads the same strings from a C header generated from this module
(`python -m peft_doubter.deploy.sidecar_format --header llama-doubter-keys.h`), so the writer and the reader cannot drift.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import ENCODER_TYPES, POOLINGS, READ_POSITIONS, SIDECAR_CONFIDENCES, SIGNAL_LIMIT, TOKEN_SIGNALS


# general keys, as in llama.cpp's LoRA adapters
KEY_GENERAL_TYPE = "general.type"
KEY_GENERAL_ARCHITECTURE = "general.architecture"
KEY_ADAPTER_TYPE = "adapter.type"
GENERAL_TYPE = "adapter"
ADAPTER_TYPE = "doubter"
KEY_PREFIX = "adapter.doubter."

SIDECAR_ENCODERS = ENCODER_TYPES  # the llama.cpp loader implements every encoder
# read_position='answer' sidecars read the answer's last token (`last` pooling only, as pass 1 drafts it); the
# `attentive` encoder also every answer token's states and TOKEN_SIGNALS
ANSWER_READING_POOLING = "last"
TRANSFORMER_BLOCKS = 2  # self-attention blocks of the `transformer` encoder

# HF `model_type` -> llama.cpp architecture name (the only table of it); each llama.cpp graph builder of these
# architectures calls `build_cvec` right before `l_out`, where the cross-attention is added.
LLAMA_CPP_ARCH = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
}


@dataclass(frozen=True)
class MetaKey:
    """One `adapter.doubter.*` metadata entry: the metadata dict field and its GGUF value type."""

    field: str
    kind: str  # "u32", "f32", "bool", "str", "i32[]"
    required: bool = True

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.field


META_KEYS = (
    MetaKey("base_architecture", "str"),
    MetaKey("n_embd", "u32"),
    MetaKey("n_layer", "u32"),
    MetaKey("read_layers", "i32[]"),
    MetaKey("inject_layers", "i32[]"),
    MetaKey("encoder_type", "str"),
    MetaKey("pooling", "str"),
    MetaKey("num_cognitive_tokens", "u32"),  # the effective T (= number of read layers unless multi_token)
    MetaKey("encoder_bottleneck_dim", "u32"),
    MetaKey("ca_bottleneck_dim", "u32"),
    MetaKey("ca_num_heads", "u32"),
    # the cross-attention update is multiplied by the per-position RMS of the layer output; required for writing,
    # read as false from files written before it existed (`LEGACY_DEFAULTS`)
    MetaKey("ca_scale_by_rms", "bool"),
    MetaKey("dynamic_gates", "bool"),
    MetaKey("layer_norm_eps", "f32"),
    MetaKey("agc_enabled", "bool"),
    MetaKey("agc_floor", "f32"),
    MetaKey("agc_tau", "f32"),
    MetaKey("dynamic_refresh", "bool"),
    MetaKey("refresh_threshold", "f32"),
    MetaKey("refresh_interval", "u32"),
    MetaKey("refusal_text", "str"),
    # the confidence the Doubter was trained and evaluated with (`names.SIDECAR_CONFIDENCES`); llama.cpp computes
    # `decision` and `head`
    MetaKey("confidence", "str"),
    # what pass 1 reads (`names.READ_POSITIONS`): the prompt, or the base's own greedy answer (read as `prompt` from
    # files written before it existed)
    MetaKey("read_position", "str"),
    # read_position='answer' only: the draft's length (and the `attentive` encoder's position embedding rows)
    MetaKey("max_draft_tokens", "u32", required=False),
    # the `attentive` encoder only: the queries pooling the answer's tokens
    MetaKey("answer_tokens", "u32", required=False),
    MetaKey("base_fingerprint", "str", required=False),  # JSON text
)
META_BY_FIELD = {m.field: m for m in META_KEYS}


def conditional_keys(read_position: str, encoder_type: str) -> tuple[str, ...]:
    """The optional metadata fields a sidecar with this reading and encoder must hold."""
    return (("max_draft_tokens",) if read_position == "answer" else ()) + (
        ("answer_tokens",) if encoder_type == "attentive" else ())


# values for required keys that older sidecars lack, used only when reading (the llama.cpp loader reads the same
# defaults)
LEGACY_DEFAULTS = {"ca_scale_by_rms": False, "confidence": "ratio", "read_position": "prompt"}


@dataclass(frozen=True)
class TensorName:
    """A canonical (PyTorch) parameter name and its short GGUF name; `{r}`, `{k}`, `{l}` are read-layer position,
    transformer-block index and inject-layer number."""

    macro: str  # suffix of the C macro in the generated header
    canonical: str
    gguf: str


TENSOR_NAMES = (
    TensorName("ENC_PROJ_NORM_W", "encoder.projectors.{r}.norm.weight", "dbt.enc.p.{r}.ln.w"),
    TensorName("ENC_PROJ_NORM_B", "encoder.projectors.{r}.norm.bias", "dbt.enc.p.{r}.ln.b"),
    TensorName("ENC_PROJ_W", "encoder.projectors.{r}.linear.weight", "dbt.enc.p.{r}.fc.w"),
    TensorName("ENC_PROJ_B", "encoder.projectors.{r}.linear.bias", "dbt.enc.p.{r}.fc.b"),
    TensorName("ENC_GATES", "encoder.gates", "dbt.enc.gates"),
    TensorName("ENC_GATE_NET_W", "encoder.gate_nets.{r}.weight", "dbt.enc.g.{r}.w"),
    TensorName("ENC_GATE_NET_B", "encoder.gate_nets.{r}.bias", "dbt.enc.g.{r}.b"),
    TensorName("ENC_BLK_QKV_W", "encoder.blocks.{k}.self_attn.in_proj_weight", "dbt.enc.blk.{k}.qkv.w"),
    TensorName("ENC_BLK_QKV_B", "encoder.blocks.{k}.self_attn.in_proj_bias", "dbt.enc.blk.{k}.qkv.b"),
    TensorName("ENC_BLK_OUT_W", "encoder.blocks.{k}.self_attn.out_proj.weight", "dbt.enc.blk.{k}.o.w"),
    TensorName("ENC_BLK_OUT_B", "encoder.blocks.{k}.self_attn.out_proj.bias", "dbt.enc.blk.{k}.o.b"),
    TensorName("ENC_BLK_FFN_UP_W", "encoder.blocks.{k}.linear1.weight", "dbt.enc.blk.{k}.ffn1.w"),
    TensorName("ENC_BLK_FFN_UP_B", "encoder.blocks.{k}.linear1.bias", "dbt.enc.blk.{k}.ffn1.b"),
    TensorName("ENC_BLK_FFN_DOWN_W", "encoder.blocks.{k}.linear2.weight", "dbt.enc.blk.{k}.ffn2.w"),
    TensorName("ENC_BLK_FFN_DOWN_B", "encoder.blocks.{k}.linear2.bias", "dbt.enc.blk.{k}.ffn2.b"),
    TensorName("ENC_BLK_NORM1_W", "encoder.blocks.{k}.norm1.weight", "dbt.enc.blk.{k}.ln1.w"),
    TensorName("ENC_BLK_NORM1_B", "encoder.blocks.{k}.norm1.bias", "dbt.enc.blk.{k}.ln1.b"),
    TensorName("ENC_BLK_NORM2_W", "encoder.blocks.{k}.norm2.weight", "dbt.enc.blk.{k}.ln2.w"),
    TensorName("ENC_BLK_NORM2_B", "encoder.blocks.{k}.norm2.bias", "dbt.enc.blk.{k}.ln2.b"),
    TensorName("ENC_QUERIES", "encoder.queries", "dbt.enc.q"),
    TensorName("ENC_QATTN_QKV_W", "encoder.query_attn.in_proj_weight", "dbt.enc.qa.qkv.w"),
    TensorName("ENC_QATTN_QKV_B", "encoder.query_attn.in_proj_bias", "dbt.enc.qa.qkv.b"),
    TensorName("ENC_QATTN_OUT_W", "encoder.query_attn.out_proj.weight", "dbt.enc.qa.o.w"),
    TensorName("ENC_QATTN_OUT_B", "encoder.query_attn.out_proj.bias", "dbt.enc.qa.o.b"),
    TensorName("ENC_OUT_NORM_W", "encoder.output.norm.weight", "dbt.enc.out.ln.w"),
    TensorName("ENC_OUT_NORM_B", "encoder.output.norm.bias", "dbt.enc.out.ln.b"),
    TensorName("ENC_OUT_FC1_W", "encoder.output.fc1.weight", "dbt.enc.out.fc1.w"),
    TensorName("ENC_OUT_FC1_B", "encoder.output.fc1.bias", "dbt.enc.out.fc1.b"),
    TensorName("ENC_OUT_FC2_W", "encoder.output.fc2.weight", "dbt.enc.out.fc2.w"),
    TensorName("ENC_OUT_FC2_B", "encoder.output.fc2.bias", "dbt.enc.out.fc2.b"),
    TensorName("ENC_OUTPUT_NORM_W", "encoder.output_norm.weight", "dbt.enc.onorm.w"),
    TensorName("ENC_OUTPUT_NORM_B", "encoder.output_norm.bias", "dbt.enc.onorm.b"),
    TensorName("ENC_ANS_SIG1_W", "encoder.answer_pooling.signals.0.weight", "dbt.enc.ans.sig1.w"),
    TensorName("ENC_ANS_SIG1_B", "encoder.answer_pooling.signals.0.bias", "dbt.enc.ans.sig1.b"),
    TensorName("ENC_ANS_SIG2_W", "encoder.answer_pooling.signals.2.weight", "dbt.enc.ans.sig2.w"),
    TensorName("ENC_ANS_SIG2_B", "encoder.answer_pooling.signals.2.bias", "dbt.enc.ans.sig2.b"),
    TensorName("ENC_ANS_POS", "encoder.answer_pooling.position.weight", "dbt.enc.ans.pos"),
    TensorName("ENC_ANS_QUERIES", "encoder.answer_pooling.queries", "dbt.enc.ans.q"),
    TensorName("ENC_ANS_NULL", "encoder.answer_pooling.null", "dbt.enc.ans.null"),
    TensorName("ENC_ANS_QKV_W", "encoder.answer_pooling.attention.in_proj_weight", "dbt.enc.ans.qkv.w"),
    TensorName("ENC_ANS_QKV_B", "encoder.answer_pooling.attention.in_proj_bias", "dbt.enc.ans.qkv.b"),
    TensorName("ENC_ANS_OUT_W", "encoder.answer_pooling.attention.out_proj.weight", "dbt.enc.ans.o.w"),
    TensorName("ENC_ANS_OUT_B", "encoder.answer_pooling.attention.out_proj.bias", "dbt.enc.ans.o.b"),
    TensorName("ENC_CONF_HEAD_W", "encoder.confidence_head.weight", "dbt.enc.conf.w"),
    TensorName("ENC_CONF_HEAD_B", "encoder.confidence_head.bias", "dbt.enc.conf.b"),
    TensorName("CA_NORM_W", "ca.{l}.norm.weight", "dbt.ca.{l}.ln.w"),
    TensorName("CA_NORM_B", "ca.{l}.norm.bias", "dbt.ca.{l}.ln.b"),
    TensorName("CA_DOWN", "ca.{l}.down_proj.weight", "dbt.ca.{l}.down"),
    TensorName("CA_Q", "ca.{l}.q_proj.weight", "dbt.ca.{l}.q"),
    TensorName("CA_K", "ca.{l}.k_proj.weight", "dbt.ca.{l}.k"),
    TensorName("CA_V", "ca.{l}.v_proj.weight", "dbt.ca.{l}.v"),
    TensorName("CA_UP", "ca.{l}.up_proj.weight", "dbt.ca.{l}.up"),
    TensorName("CA_TOKEN_PREF", "ca.{l}.token_preference", "dbt.ca.{l}.pref"),
    TensorName("CA_GATE", "ca.{l}.gate", "dbt.ca.{l}.gate"),
)
GGUF_NAME_MAX = 63  # GGML_MAX_NAME is 64 including the terminating NUL


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{r\}", r"(\d+)").replace(r"\{k\}", r"(\d+)")
                      .replace(r"\{l\}", r"(\d+)") + "$")


_TO_GGUF = [(_pattern(t.canonical), t.gguf) for t in TENSOR_NAMES]
_TO_CANONICAL = [(_pattern(t.gguf), t.canonical) for t in TENSOR_NAMES]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            for index in match.groups():
                template = re.sub(r"\{[rkl]\}", index, template, count=1)
            return template
    raise KeyError(f"unknown Doubter tensor name {name!r}")


def to_gguf_name(canonical: str) -> str:
    """Canonical PyTorch parameter name -> GGUF tensor name (KeyError if it is not a Doubter tensor)."""
    return _translate(canonical, _TO_GGUF)


def to_canonical_name(gguf_name: str) -> str:
    """GGUF tensor name -> canonical PyTorch parameter name (KeyError if it is not a Doubter tensor)."""
    return _translate(gguf_name, _TO_CANONICAL)


def llama_cpp_arch(model_type: str) -> str:
    """llama.cpp architecture name for a HF `model_type`."""
    try:
        return LLAMA_CPP_ARCH[model_type]
    except KeyError:
        raise ValueError(
            f"`base_architecture` {model_type!r} has no llama.cpp mapping; supported: {sorted(LLAMA_CPP_ARCH)}."
        ) from None


def feature_dim(metadata: Mapping[str, Any]) -> int:
    """Floats per read layer in the pooled features: n_embd, or 2 * n_embd for `last_mean`."""
    return int(metadata["n_embd"]) * (2 if metadata["pooling"] == "last_mean" else 1)


def token_count(metadata: Mapping[str, Any]) -> int:
    """Number of cognitive tokens T: the read layers (plus `answer_tokens` for attentive), or
    `num_cognitive_tokens` learned queries for multi_token."""
    if metadata["encoder_type"] == "multi_token":
        return int(metadata["num_cognitive_tokens"])
    if metadata["encoder_type"] == "attentive":
        return len(metadata["read_layers"]) + int(metadata["answer_tokens"])
    return len(metadata["read_layers"])


def expected_shapes(metadata: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Canonical name -> numpy (PyTorch) shape of every tensor the sidecar must hold."""
    hidden, d_in, n_tok = int(metadata["n_embd"]), feature_dim(metadata), token_count(metadata)
    b, b_ca = int(metadata["encoder_bottleneck_dim"]), int(metadata["ca_bottleneck_dim"])
    shapes: dict[str, tuple[int, ...]] = {}
    for r in range(len(metadata["read_layers"])):
        p = f"encoder.projectors.{r}."
        shapes.update({p + "norm.weight": (d_in,), p + "norm.bias": (d_in,),
                       p + "linear.weight": (b, d_in), p + "linear.bias": (b,)})
        if metadata["dynamic_gates"]:
            shapes.update({f"encoder.gate_nets.{r}.weight": (1, d_in), f"encoder.gate_nets.{r}.bias": (1,)})
    if not metadata["dynamic_gates"]:
        shapes["encoder.gates"] = (len(metadata["read_layers"]),)
    attn = {"in_proj_weight": (3 * b, b), "in_proj_bias": (3 * b,), "out_proj.weight": (b, b), "out_proj.bias": (b,)}
    if metadata["encoder_type"] == "transformer":
        for k in range(TRANSFORMER_BLOCKS):
            p = f"encoder.blocks.{k}."
            shapes.update({p + "self_attn." + n: s for n, s in attn.items()})
            shapes.update({p + "linear1.weight": (4 * b, b), p + "linear1.bias": (4 * b,),
                           p + "linear2.weight": (b, 4 * b), p + "linear2.bias": (b,),
                           p + "norm1.weight": (b,), p + "norm1.bias": (b,),
                           p + "norm2.weight": (b,), p + "norm2.bias": (b,)})
    elif metadata["encoder_type"] == "multi_token":
        shapes["encoder.queries"] = (n_tok, b)
        shapes.update({"encoder.query_attn." + n: s for n, s in attn.items()})
    elif metadata["encoder_type"] == "attentive":
        p = "encoder.answer_pooling."
        shapes.update({p + "signals.0.weight": (b, len(TOKEN_SIGNALS)), p + "signals.0.bias": (b,),
                       p + "signals.2.weight": (b, b), p + "signals.2.bias": (b,),
                       p + "position.weight": (int(metadata["max_draft_tokens"]), b),
                       p + "queries": (int(metadata["answer_tokens"]), b), p + "null": (1, 1, b)})
        shapes.update({p + "attention." + n: s for n, s in attn.items()})
    shapes.update({"encoder.output.norm.weight": (b,), "encoder.output.norm.bias": (b,),
                   "encoder.output.fc1.weight": (hidden, b), "encoder.output.fc1.bias": (hidden,),
                   "encoder.output.fc2.weight": (hidden, hidden), "encoder.output.fc2.bias": (hidden,),
                   "encoder.output_norm.weight": (hidden,), "encoder.output_norm.bias": (hidden,)})
    if metadata["confidence"] == "head":
        shapes.update({"encoder.confidence_head.weight": (1, hidden), "encoder.confidence_head.bias": (1,)})
    for layer in metadata["inject_layers"]:
        p = f"ca.{layer}."
        shapes.update({p + "norm.weight": (hidden,), p + "norm.bias": (hidden,),
                       p + "down_proj.weight": (b_ca, hidden), p + "q_proj.weight": (b_ca, b_ca),
                       p + "k_proj.weight": (b_ca, hidden), p + "v_proj.weight": (b_ca, hidden),
                       p + "up_proj.weight": (hidden, b_ca), p + "token_preference": (n_tok,), p + "gate": (1,)})
    return shapes


def c_header() -> str:
    """The C header with every string of the format, for the llama.cpp loader."""

    def define(name: str, value: Any) -> str:
        text = f'"{value}"' if isinstance(value, str) else str(value)
        return f"#define LLAMA_DOUBTER_{name} {text}"

    lines = [
        "// Generated by `python -m peft_doubter.deploy.sidecar_format --header`; do not edit.",
        "#pragma once",
        "",
        define("KV_GENERAL_TYPE", KEY_GENERAL_TYPE),
        define("KV_GENERAL_ARCHITECTURE", KEY_GENERAL_ARCHITECTURE),
        define("KV_ADAPTER_TYPE", KEY_ADAPTER_TYPE),
        define("VAL_GENERAL_TYPE", GENERAL_TYPE),
        define("VAL_ADAPTER_TYPE", ADAPTER_TYPE),
        define("TRANSFORMER_BLOCKS", TRANSFORMER_BLOCKS),
        define("N_TOKEN_SIGNALS", len(TOKEN_SIGNALS)),
        define("SIGNAL_LIMIT", SIGNAL_LIMIT),
        "",
    ]
    lines += [define("KV_" + m.field.upper(), m.key) for m in META_KEYS]
    lines.append("")
    lines += [define("NAME_ENCODER_" + t.upper(), t) for t in SIDECAR_ENCODERS]
    lines += [define("NAME_POOLING_" + p.upper(), p) for p in POOLINGS]
    lines += [define("NAME_CONFIDENCE_" + c.upper(), c) for c in SIDECAR_CONFIDENCES]
    lines += [define("NAME_READ_POSITION_" + p.upper(), p) for p in READ_POSITIONS]
    lines.append("")
    lines.append("// tensor names: printf formats, %d = read-layer position {r}, block {k} or inject layer {l}")
    lines += [define("TN_" + t.macro, re.sub(r"\{[rkl]\}", "%d", t.gguf)) for t in TENSOR_NAMES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header", type=Path, required=True, help="Write the C header to this path.")
    args = parser.parse_args(argv)
    args.header.parent.mkdir(parents=True, exist_ok=True)
    args.header.write_text(c_header())


if __name__ == "__main__":
    main()
