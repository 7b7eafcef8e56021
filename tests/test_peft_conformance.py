"""What PEFT's generic tuner tests (`tests/testing_common.py` in huggingface/peft) check of every tuner, run on the
Doubter over tiny models of six families. Merging is the one declared exception: it raises `NotImplementedError`."""

from __future__ import annotations

import os
import warnings
from operator import attrgetter

import pytest
import tiny_models
import torch
from peft import (
    PeftConfig,
    PeftModel,
    get_base_model_state_dict,
    get_peft_model,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_doubter import DoubterConfig


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2")
# init_weights=False: the adapter changes the output from the start (PEFT's convention for these tests).
KWARGS = {"target_layers": [1, 2, 3], "cross_attn_layers": [2, 3], "encoder_bottleneck_dim": 32, "ca_bottleneck_dim": 32,
              "init_weights": False, **tiny_models.TWO_PASS}
families = pytest.mark.parametrize("family", FAMILIES)


def base(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_models.build(family).to(dtype)


def inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 12, 7, 3], [1, 8, 4, 4, 6, 2]]),
            "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def first_scores(model) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs(), max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, pad_token_id=0).scores[0]


@families
def test_model_attributes_and_adapter_name(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS), adapter_name="test-adapter")
    assert all(hasattr(model, name) for name in ("save_pretrained", "from_pretrained", "push_to_hub"))
    names = [name for name, _ in model.named_parameters() if "test-adapter" in name]
    assert names and any("doubter_encoder" in n for n in names) and any("doubter_ca" in n for n in names)


@families
def test_prepare_for_training(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS))
    assert not model.get_input_embeddings()(inputs()["input_ids"]).requires_grad
    prepared = prepare_model_for_kbit_training(base(family))
    assert not any(p.requires_grad for p in prepared.parameters())
    model = get_peft_model(prepared, DoubterConfig(**KWARGS))
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(inputs()["input_ids"]).requires_grad


@families
def test_save_pretrained_round_trip(family, tmp_path):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS)).eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base(family), tmp_path)
    assert not [r for r in records if "missing adapter keys" in str(r.message).lower()]
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    assert not {"model.safetensors", "config.json", "adapter_model.bin"} & files
    torch.testing.assert_close(logits(loaded), logits(model))


@families
def test_selected_adapters_and_multiple_adapters_load(family, tmp_path):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS))
    model.add_adapter("other", DoubterConfig(**{**KWARGS, "target_layers": [0, 3]}))
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(base(family), tmp_path)
    first = loaded.load_adapter(tmp_path / "other", adapter_name="other")
    second = loaded.load_adapter(tmp_path, adapter_name="yet-another")
    assert first.missing_keys == [] and second.missing_keys == []
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded.eval()), logits(model.eval()))


@families
def test_from_pretrained_with_a_given_config(family, tmp_path):
    config = DoubterConfig(**KWARGS)
    get_peft_model(base(family), config).save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), DoubterConfig)
    loaded = PeftModel.from_pretrained(base(family), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode


@families
def test_low_cpu_mem_usage_loading(family, tmp_path):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS)).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(family), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(loaded), logits(model))
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), logits(model))
    empty = get_peft_model(base(family), DoubterConfig(**KWARGS), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in empty.named_parameters() if "doubter_" in n} == {"meta"}
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):  # PEFT's rule for tuners with shared state
        inject_adapter_in_model(DoubterConfig(**KWARGS), base(family), low_cpu_mem_usage=True)


@families
def test_merging_is_refused_with_the_alternative(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="unload"):
            merge()


@families
def test_generate_in_half_precision(family):
    model = get_peft_model(base(family, torch.bfloat16), DoubterConfig(**KWARGS))
    out = model.generate(input_ids=torch.tensor([[1, 1, 1], [2, 1, 2]]),
                         attention_mask=torch.tensor([[1, 1, 1], [1, 0, 1]]), max_new_tokens=3, pad_token_id=0)
    assert out.shape[0] == 2 and out.shape[1] > 3


@families
def test_training_touches_only_the_adapter(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS)).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = inputs()["input_ids"]
    labels = ids.masked_fill(torch.arange(6) < 3, -100)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("doubter_" in name) or ("doubter_" in name and param.grad is not None), name


@families
@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
def test_delete_adapter(family, active):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS))
    model.add_adapter("delete_me", DoubterConfig(**KWARGS))
    if active:
        model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()):
            assert "delete_me" not in attrgetter(attr)(module)
    assert "delete_me" not in model.base_model.doubter_encoder
    logits(model)
    model.delete_adapter("default")
    assert "default" not in model.peft_config and model.active_adapters == []
    torch.testing.assert_close(model.base_model(**inputs()).logits, base(family)(**inputs()).logits)
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


@families
def test_unload_gives_back_the_base(family):
    plain = base(family)
    expected = logits(plain)
    model = get_peft_model(plain, DoubterConfig(**KWARGS)).eval()
    count = len(base(family).state_dict())
    with_adapter = logits(model)
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config") and len(unloaded.state_dict()) == count
    assert not torch.allclose(with_adapter, logits(unloaded), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logits(unloaded), expected, atol=1e-4, rtol=1e-4)


@families
def test_disable_adapter(family):
    plain = base(family)
    before = first_scores(plain)
    model = get_peft_model(plain, DoubterConfig(**KWARGS))
    with_adapter = first_scores(model)
    assert not torch.allclose(before, with_adapter)
    with model.disable_adapter():
        torch.testing.assert_close(first_scores(model), before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(first_scores(model), with_adapter, atol=1e-6, rtol=1e-6)


@families
def test_inputs_embeds_work_like_input_ids(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS), adapter_name="test-adapter").eval()
    embeds = model.get_input_embeddings()(inputs()["input_ids"])
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs()["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, logits(model), atol=1e-5, rtol=1e-5)


@families
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_adapter_dtype(family, dtype):
    upcast = get_peft_model(base(family, dtype), DoubterConfig(**KWARGS))
    kept = get_peft_model(base(family, dtype), DoubterConfig(**KWARGS), autocast_adapter_dtype=False)
    adapter = lambda model: [p for n, p in model.named_parameters() if "doubter_" in n]  # noqa: E731
    assert {p.dtype for p in adapter(upcast)} == {torch.float32}
    assert {p.dtype for p in adapter(kept)} == {dtype}
    assert logits(kept).dtype == dtype


@families
def test_base_model_state_dict_round_trip(family):
    plain = base(family)
    original = {key: value.clone() for key, value in plain.state_dict().items()}
    model = get_peft_model(plain, DoubterConfig(**KWARGS))
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    assert all(torch.equal(original[key], extracted[key]) for key in original)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(0.1)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    restored = get_base_model_state_dict(model)
    assert all(torch.equal(original[key], restored[key]) for key in original)


def test_init_weights_true_leaves_the_base_unchanged():
    plain = base("llama")
    expected = logits(plain)
    model = get_peft_model(plain, DoubterConfig(**{**KWARGS, "init_weights": True}))
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_from_inputs_embeds_matches_input_ids(family):
    model = get_peft_model(base(family), DoubterConfig(**KWARGS)).eval()
    ids = inputs()["input_ids"]
    from_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])
