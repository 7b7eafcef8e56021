"""nf4 and int8 bases through bitsandbytes' CPU backend: the Doubter trains and generates on them."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_doubter import DoubterConfig


pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_models.build("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_quantized_base_trains_generates_and_round_trips(kind, base_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANTIZATIONS[kind], device_map="cpu")
    assert "bitsandbytes" in type(base.model.layers[0].mlp.up_proj).__module__
    ids = torch.randint(3, tiny_models.VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, DoubterConfig(target_layers=[1, 2, 3], encoder_bottleneck_dim=32,
                                               ca_bottleneck_dim=32, **tiny_models.TWO_PASS))
    model.train()
    labels = ids.masked_fill(torch.arange(10) < 5, -100)
    model(input_ids=ids, labels=labels).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("doubter_" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3).shape == (2, 13)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANTIZATIONS[kind], device_map="cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
