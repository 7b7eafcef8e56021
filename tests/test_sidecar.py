"""The GGUF sidecar: one set of key/tensor names shared by the Python writer and the llama.cpp loader, a
validating write/read round trip, and clear errors on corrupt or foreign files. Fast: no llama.cpp build."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from peft_doubter.deploy import numpy_reference as ref
from peft_doubter.deploy import sidecar_format as fmt
from peft_doubter.deploy.sidecar import read_sidecar, write_sidecar


PATCH = Path(__file__).resolve().parents[1] / "llama_cpp_patch" / "doubter.patch"
# metadata the C++ loader has no use for: it checks `general.architecture` instead of the HF model type
UNREAD_BY_CPP = {"base_architecture", "base_fingerprint"}


def make_metadata(**overrides) -> dict:
    meta = {
        "base_architecture": "gemma3_text", "n_embd": 16, "n_layer": 6, "read_layers": [2, 4, 5], "inject_layers": [3, 5],
        "encoder_type": "selective", "pooling": "last", "encoder_bottleneck_dim": 8, "ca_bottleneck_dim": 8, "ca_num_heads": 2,
        "ca_scale_by_rms": True, "dynamic_gates": False, "layer_norm_eps": 1e-5, "agc_enabled": True, "agc_floor": 0.3, "agc_tau": 16.0,
        "dynamic_refresh": False, "refresh_threshold": 0.85, "refresh_interval": 8,
        "refusal_text": "I'm not confident enough to answer this question accurately.", "confidence": "decision",
        "read_position": "prompt",
    }
    meta.update(overrides)
    return meta


def config_id(config: dict) -> str:
    return f"{config['encoder_type']}-{config['pooling']}-dyn{int(config['dynamic_gates'])}"


ATTENTIVE = {"read_position": "answer", "answer_tokens": 2, "max_draft_tokens": 5}
CONFIGS = [
    dict(encoder_type=e, pooling=p, dynamic_gates=g, **({"num_cognitive_tokens": 4} if e == "multi_token" else {}),
         **(ATTENTIVE if e == "attentive" else {}))
    for e, p, g in itertools.product(fmt.SIDECAR_ENCODERS, fmt.POOLINGS, (False, True))
    if e != "attentive" or p == fmt.ANSWER_READING_POOLING  # answer reading pools nothing
] + [{"encoder_type": "selective", "pooling": "last", "dynamic_gates": False, "read_position": "answer",
       "max_draft_tokens": 8}]


def write_random(path: Path, seed: int = 0, **overrides) -> tuple[dict, dict]:
    meta = make_metadata(**overrides)
    weights = ref.random_weights(meta, seed=seed)
    write_sidecar(path, weights, meta)
    return weights, meta


# -- names shared with the C++ side ----------------------------------------------------------------------------


def header_defines() -> dict[str, str]:
    return dict(re.findall(r'^#define (LLAMA_DOUBTER_\w+) "?(.*?)"?$', fmt.c_header(), flags=re.MULTILINE))


def test_header_defines_every_name_of_the_format():
    defines = header_defines()
    assert defines["LLAMA_DOUBTER_KV_GENERAL_TYPE"] == fmt.KEY_GENERAL_TYPE == gguf.Keys.General.TYPE
    assert (defines["LLAMA_DOUBTER_KV_GENERAL_ARCHITECTURE"] == fmt.KEY_GENERAL_ARCHITECTURE
            == gguf.Keys.General.ARCHITECTURE)
    assert defines["LLAMA_DOUBTER_KV_ADAPTER_TYPE"] == fmt.KEY_ADAPTER_TYPE == gguf.Keys.Adapter.TYPE
    assert defines["LLAMA_DOUBTER_VAL_GENERAL_TYPE"] == "adapter"
    assert defines["LLAMA_DOUBTER_VAL_ADAPTER_TYPE"] == "doubter"
    assert defines["LLAMA_DOUBTER_TRANSFORMER_BLOCKS"] == str(fmt.TRANSFORMER_BLOCKS)
    for m in fmt.META_KEYS:
        assert defines[f"LLAMA_DOUBTER_KV_{m.field.upper()}"] == m.key
    for t in fmt.TENSOR_NAMES:
        assert defines[f"LLAMA_DOUBTER_TN_{t.macro}"] == re.sub(r"\{[rkl]\}", "%d", t.gguf)
    for name in (*fmt.SIDECAR_ENCODERS, *fmt.POOLINGS):
        assert name in defines.values()


def test_patch_uses_exactly_the_generated_names():
    """The C++ loader reads every key and tensor the writer writes, and names nothing the header lacks."""
    used = set(re.findall(r"\bLLAMA_DOUBTER_(?:KV|TN|VAL|NAME)_\w+", PATCH.read_text()))
    defined = set(header_defines())
    assert used <= defined, f"names the C++ side uses but the format does not define: {sorted(used - defined)}"
    expected = {f"LLAMA_DOUBTER_KV_{m.field.upper()}" for m in fmt.META_KEYS if m.field not in UNREAD_BY_CPP}
    expected |= {f"LLAMA_DOUBTER_TN_{t.macro}" for t in fmt.TENSOR_NAMES}
    expected |= {n for n in defined if n.startswith(("LLAMA_DOUBTER_NAME_", "LLAMA_DOUBTER_VAL_"))}
    assert expected <= used, f"names the writer writes but the C++ side never reads: {sorted(expected - used)}"


def test_header_command_writes_the_header(tmp_path):
    fmt.main(["--header", str(tmp_path / "sub" / "keys.h")])
    assert (tmp_path / "sub" / "keys.h").read_text() == fmt.c_header()


def test_tensor_names_round_trip_and_fit_ggml():
    meta = make_metadata(encoder_type="transformer", dynamic_gates=True, inject_layers=[0, 5], n_layer=1000,
                         read_layers=list(range(990, 1000)))
    names = list(fmt.expected_shapes(meta)) + list(fmt.expected_shapes(make_metadata(encoder_type="multi_token",
                                                                                     num_cognitive_tokens=3)))
    names.append("encoder.gates")
    for name in names:
        short = fmt.to_gguf_name(name)
        assert len(short) <= fmt.GGUF_NAME_MAX and fmt.to_canonical_name(short) == name
    assert fmt.to_gguf_name("ca.123.down_proj.weight") == "dbt.ca.123.down"
    with pytest.raises(KeyError):
        fmt.to_gguf_name("encoder.probe.weight")


def test_arch_table():
    assert fmt.llama_cpp_arch("gemma3_text") == "gemma3" and fmt.llama_cpp_arch("llama") == "llama"
    with pytest.raises(ValueError, match="base_architecture"):
        fmt.llama_cpp_arch("gpt2")


# -- write / read ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_round_trip(tmp_path, config):
    weights, meta = write_random(tmp_path / "d.gguf", base_fingerprint={"layers": 6, "sha": "ab"}, **config)
    tensors, read = read_sidecar(tmp_path / "d.gguf")
    assert tensors.keys() == weights.keys()
    for name, value in weights.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], value), name
    for key, value in meta.items():
        expected = float(np.float32(value)) if isinstance(value, float) else value
        assert read[key] == expected, key
    assert read["num_cognitive_tokens"] == {"multi_token": 4, "attentive": 3 + 2}.get(config["encoder_type"], 3)
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    assert reader.get_field("general.architecture").contents() == "gemma3"
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "doubter"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w, m: w.pop("ca.3.gate"), "missing \\['ca.3.gate'\\]"),
        (lambda w, m: w.update({"encoder.probe.weight": np.zeros(2, np.float32)}),
         "unexpected \\['encoder.probe.weight'\\]"),
        (lambda w, m: w.update({"ca.5.up_proj.weight": np.zeros((8, 16), np.float32)}),
         "ca.5.up_proj.weight: \\(8, 16\\) vs \\(16, 8\\)"),
        (lambda w, m: w["encoder.gates"].__setitem__(0, np.nan), "finite"),
        (lambda w, m: m.update(base_architecture="gpt2"), "base_architecture"),
        (lambda w, m: m.update(inject_layers=[3, 6]), "inject_layers"),
        (lambda w, m: m.update(ca_num_heads=3), "divisible"),
        (lambda w, m: m.update(num_cognitive_tokens=5), "num_cognitive_tokens"),
        (lambda w, m: m.update(pooling="max"), "pooling"),
        (lambda w, m: m.pop("agc_tau"), "agc_tau"),
        (lambda w, m: m.pop("ca_scale_by_rms"), "ca_scale_by_rms"),
        (lambda w, m: m.update(ca_scale_by_rms=1), "ca_scale_by_rms"),
        (lambda w, m: m.update(confidence="probe"), "confidence"),
        (lambda w, m: m.update(read_position="middle"), "read_position"),
        (lambda w, m: m.update(read_position="answer"), "max_draft_tokens"),
        (lambda w, m: m.update(read_position="answer", max_draft_tokens=8, pooling="mean"), "needs pooling='last'"),
        (lambda w, m: m.update(encoder_type="attentive"), "answer_tokens"),
        (lambda w, m: m.update(encoder_type="attentive", answer_tokens=2), "needs read_position='answer'"),
        (lambda w, m: m.update(extra=1), "Unknown"),
    ],
)
def test_write_rejects_inconsistent_inputs(tmp_path, change, message):
    meta = make_metadata()
    weights = ref.random_weights(meta)
    change(weights, meta)
    with pytest.raises(ValueError, match=message):
        write_sidecar(tmp_path / "d.gguf", weights, meta)
    assert not list(tmp_path.iterdir())


def test_read_treats_a_missing_rms_flag_as_false(tmp_path, monkeypatch):
    """Sidecars written before `ca_scale_by_rms` existed read as the old behaviour (no RMS scaling)."""
    key, add_bool = fmt.META_BY_FIELD["ca_scale_by_rms"].key, gguf.GGUFWriter.add_bool
    monkeypatch.setattr(gguf.GGUFWriter, "add_bool", lambda self, k, v: None if k == key else add_bool(self, k, v))
    write_random(tmp_path / "d.gguf", ca_scale_by_rms=True)
    monkeypatch.undo()
    assert gguf.GGUFReader(tmp_path / "d.gguf").get_field(key) is None
    assert read_sidecar(tmp_path / "d.gguf")[1]["ca_scale_by_rms"] is False
    write_random(tmp_path / "e.gguf", ca_scale_by_rms=False)
    assert read_sidecar(tmp_path / "e.gguf")[1]["ca_scale_by_rms"] is False


def test_read_treats_a_missing_confidence_as_ratio(tmp_path, monkeypatch):
    """Sidecars written before the `confidence` key existed were all ratio-confidence Doubters."""
    key, add_string = fmt.META_BY_FIELD["confidence"].key, gguf.GGUFWriter.add_string
    monkeypatch.setattr(gguf.GGUFWriter, "add_string", lambda self, k, v: None if k == key else add_string(self, k, v))
    write_random(tmp_path / "d.gguf", confidence="decision")
    monkeypatch.undo()
    assert gguf.GGUFReader(tmp_path / "d.gguf").get_field(key) is None
    assert read_sidecar(tmp_path / "d.gguf")[1]["confidence"] == "ratio"
    write_random(tmp_path / "e.gguf", confidence="decision")
    assert read_sidecar(tmp_path / "e.gguf")[1]["confidence"] == "decision"


def test_read_treats_a_missing_read_position_as_prompt(tmp_path, monkeypatch):
    """Sidecars written before the `read_position` key existed all read the prompt."""
    key, add_string = fmt.META_BY_FIELD["read_position"].key, gguf.GGUFWriter.add_string
    monkeypatch.setattr(gguf.GGUFWriter, "add_string", lambda self, k, v: None if k == key else add_string(self, k, v))
    write_random(tmp_path / "d.gguf")
    monkeypatch.undo()
    assert gguf.GGUFReader(tmp_path / "d.gguf").get_field(key) is None
    assert read_sidecar(tmp_path / "d.gguf")[1]["read_position"] == "prompt"


def test_read_rejects_truncated_files(tmp_path):
    write_random(tmp_path / "d.gguf")
    data = (tmp_path / "d.gguf").read_bytes()
    for size in (0, 3, 40, len(data) // 3, len(data) - 5):
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(ValueError):
            read_sidecar(tmp_path / "cut.gguf")


def test_read_rejects_random_bytes(tmp_path):
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_sidecar(tmp_path / "noise.gguf")
    with pytest.raises(FileNotFoundError):
        read_sidecar(tmp_path / "absent.gguf")


def _plain_gguf(path: Path, general_type: str, adapter_type: str | None) -> None:
    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_type(general_type)
    if adapter_type:
        writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_read_rejects_foreign_gguf(tmp_path):
    _plain_gguf(tmp_path / "lora.gguf", "adapter", "lora")
    with pytest.raises(ValueError, match="'lora', expected 'doubter'"):
        read_sidecar(tmp_path / "lora.gguf")
    _plain_gguf(tmp_path / "model.gguf", "model", None)
    with pytest.raises(ValueError, match="'model', expected 'adapter'"):
        read_sidecar(tmp_path / "model.gguf")


def test_read_rejects_tensor_set_not_matching_metadata(tmp_path):
    weights, _meta = write_random(tmp_path / "d.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch="gemma3")
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            value = field.contents()
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for name, value in weights.items():
        if name != "ca.5.v_proj.weight":
            writer.add_tensor(fmt.to_gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="ca.5.v_proj.weight"):
        read_sidecar(tmp_path / "bad.gguf")


# -- numpy reference -------------------------------------------------------------------------------------------


def test_reference_schedule_pooling_and_zero_gate():
    meta = make_metadata()
    assert ref.agc_alpha(meta, 0) == 1.0
    assert ref.agc_alpha(meta, 16) == pytest.approx(0.3 + 0.7 * np.exp(-1.0))
    assert ref.agc_alpha(make_metadata(agc_enabled=False), 50) == 1.0
    hidden = [np.arange(12, dtype=np.float32).reshape(3, 4) + i for i in range(2)]
    assert ref.pool(hidden, "last").tolist() == [[8, 9, 10, 11], [9, 10, 11, 12]]
    assert ref.pool(hidden, "last_mean").shape == (2, 8)
    np.testing.assert_allclose(ref.pool(hidden, "mean")[0], [4, 5, 6, 7])
    weights = ref.random_weights(meta, gate=0.0)
    h = np.random.default_rng(0).standard_normal((5, 16))
    tokens = ref.encode(weights, meta, np.random.default_rng(1).standard_normal((3, 16)))
    assert tokens.shape == (3, 16)
    np.testing.assert_array_equal(ref.cross_attention(weights, meta, 3, h, tokens), h)


def test_reference_rms_scaling():
    """With `ca_scale_by_rms` the update is the unscaled one times sqrt(mean_H(h^2)) at each position."""
    meta = make_metadata(ca_scale_by_rms=True)
    weights = ref.random_weights(meta, gate=0.3)
    h = np.random.default_rng(0).standard_normal((5, 16)) * np.arange(1, 6)[:, None] * 50
    tokens = ref.encode(weights, meta, np.random.default_rng(1).standard_normal((3, 16)))
    plain = ref.cross_attention(weights, make_metadata(ca_scale_by_rms=False), 3, h, tokens, alpha=0.7) - h
    scaled = ref.cross_attention(weights, meta, 3, h, tokens, alpha=0.7) - h
    np.testing.assert_allclose(scaled, plain * np.sqrt((h ** 2).mean(axis=1, keepdims=True)), rtol=1e-12)
