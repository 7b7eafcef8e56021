"""The Doubter on the real Gemma-3-270M from its PyPI package (slow: loads a 270M model)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.tuner.base_models import load_base_model


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_base_model("gemma-3-270m")


def test_two_pass_on_gemma_3_270m(gemma, tmp_path):
    base, tokenizer = gemma
    assert (base.config.num_hidden_layers, base.config.hidden_size) == (18, 640)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Q: What is the capital of France?\nA:", "Q: Who painted the Mona Lisa?\nA:"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = base.generate(**inputs, max_new_tokens=8, do_sample=False)
        plain_logits = base(**inputs).logits
    model = get_peft_model(base, DoubterConfig(target_layers="late", read_position="prompt", confidence="decision"))
    assert model.base_model._plans["default"].read == list(range(12, 18))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("doubter_ca.default.gate"):
                param.fill_(2.0)
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, model(**inputs, reuse_prefix=False).logits, rtol=0, atol=1e-3)
        assert (logits - plain_logits).abs().max() > 1e-2
        fast = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(fast, model.generate(**inputs, max_new_tokens=8, do_sample=False, reuse_prefix=False))
        with model.disable_adapter():
            assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), plain)
            assert torch.equal(model(**inputs).logits, plain_logits)
    text = tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(model.unload(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, logits, rtol=0, atol=1e-4)
