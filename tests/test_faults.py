"""Bad input and faults: each case gets a clear error that names the file or field, and nothing is lost or changed.
(The llama.cpp cases are in test_llama_cpp.py; the run-directory cases of a real pipeline in test_training.py.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_doubter import DoubterConfig
from peft_doubter.hub import load_doubter
from peft_doubter.tuner.loading import load_saved_doubter


CONFIG = {"target_layers": [1, 2, 3], "cross_attn_layers": [2, 3], "encoder_bottleneck_dim": 32,
          "ca_bottleneck_dim": 32}


@pytest.fixture
def saved(tmp_path) -> Path:
    """A saved Doubter adapter of the tiny Llama."""
    get_peft_model(tiny_models.build("llama"), DoubterConfig(**CONFIG)).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("field", ["ca_gate_init", "encoder_gate_init", "layer_norm_eps", "agc_tau", "agc_floor",
                                   "refresh_threshold", "correction_ratio"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        DoubterConfig(**{**CONFIG, field: value})


def test_refusal_text_must_be_a_sentence():
    with pytest.raises(ValueError, match="`refusal_text` must not be empty"):
        DoubterConfig(refusal_text=None)


def test_a_nan_weight_in_the_adapter_is_refused(saved):
    weights = load_file(saved / "adapter_model.safetensors")
    gate = next(k for k in weights if k.endswith("gate"))
    weights[gate] = torch.full_like(weights[gate], math.nan)
    save_file(weights, saved / "adapter_model.safetensors")
    before = files(saved)
    with pytest.raises(ValueError, match="did not load: non-finite values .*gate"):
        PeftModel.from_pretrained(tiny_models.build("llama"), saved)
    assert files(saved) == before


def test_another_adapters_weights_under_a_doubter_config_are_refused(saved, tmp_path):
    lora = get_peft_model(tiny_models.build("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    shutil.copy(tmp_path / "lora" / "adapter_model.safetensors", saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds no Doubter weights"):
        load_saved_doubter(tiny_models.build("llama"), saved)
    with pytest.raises(ValueError, match="did not load: .* weights are missing from the checkpoint"):
        PeftModel.from_pretrained(tiny_models.build("llama"), saved)


@pytest.mark.parametrize("edit", [{"target_layers": [0, 1, 2, 3]}, {"cross_attn_layers": [1, 2, 3]},
                                  {"encoder_type": "transformer"}, {"encoder_bottleneck_dim": 64}])
def test_a_config_edited_after_saving_is_refused(saved, edit):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match="do not match its adapter_config.json|did not load"):
        PeftModel.from_pretrained(tiny_models.build("llama"), saved)


def test_a_loaded_adapter_without_a_base_fingerprint_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "base_fingerprint": None}))
    with pytest.raises(ValueError, match="records no `base_fingerprint`"):
        PeftModel.from_pretrained(tiny_models.build("llama"), saved)
    override = DoubterConfig.from_pretrained(saved)
    override.check_base_fingerprint = False
    PeftModel.from_pretrained(tiny_models.build("llama"), saved, config=override)  # the documented way out


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable safetensors file"),
    (b"\x00" * 3, "not a readable safetensors file"),
    (np.random.default_rng(0).bytes(4096), "not a readable safetensors file"),
    (None, "adapter_model.safetensors does not exist|has no adapter_model.safetensors"),
])
def test_damaged_weights_name_the_file(saved, content, message):
    path = saved / "adapter_model.safetensors"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        load_saved_doubter(tiny_models.build("llama"), saved)
    assert str(saved) in str(error.value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_doubter(tiny_models.build("llama"), saved)


def test_truncated_weights_name_the_file(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_saved_doubter(tiny_models.build("llama"), saved)


@pytest.mark.parametrize("content,message", [
    ("{not json", "adapter_config.json is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"target_layers": [1, 2]}), "has no peft_type"),
    (json.dumps({"peft_type": "LORA", "r": 8}), "peft_type 'LORA'"),
    (json.dumps({"peft_type": "DOUBTER", "pooling": "median"}), "`pooling` must be one of"),
])
def test_damaged_configs_name_the_file_and_field(saved, content, message):
    (saved / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_saved_doubter(tiny_models.build("llama"), saved)
    assert "adapter_config.json" in str(error.value)
