"""The exported sidecar reproduces the PyTorch Doubter: PyTorch modules vs the numpy reference (the C++ port's
oracle, see test_llama_cpp.py) on the exported weights, and a write/read round trip."""

import numpy as np
import pytest
import tiny_models
import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.deploy import numpy_reference
from peft_doubter.deploy.sidecar import doubter_tensors, read_sidecar, write_sidecar
from peft_doubter.names import TOKEN_SIGNALS
from peft_doubter.tuner.capture import Reading, rms_normalized


CASES = {
    "selective-last": {},
    "transformer-last_mean": {"encoder_type": "transformer", "pooling": "last_mean"},
    "multi_token-mean-dynamic": {"encoder_type": "multi_token", "num_cognitive_tokens": 5, "pooling": "mean",
                                     "dynamic_gates": True, "agc_enabled": True, "agc_tau": 4.0},
    "selective-head": {"confidence": "head"},
    "attentive-answer-head": {"encoder_type": "attentive", "read_position": "answer", "confidence": "head",
                              "max_draft_tokens": 4, "answer_tokens": 3, "dynamic_gates": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_matches_numpy_reference_on_exported_weights(name, tmp_path):
    model = get_peft_model(tiny_models.build("gemma3"), DoubterConfig(
        target_layers=[1, 2, 3], cross_attn_layers=[2, 3], encoder_bottleneck_dim=32, ca_bottleneck_dim=32,
        **{**tiny_models.TWO_PASS, **CASES[name]}))
    torch.manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "doubter_" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    tensors, metadata = doubter_tensors(model)
    written, meta = read_sidecar(write_sidecar(tmp_path / "s.gguf", tensors, metadata))
    assert written.keys() == tensors.keys() and all(np.array_equal(written[k], tensors[k]) for k in tensors)

    doubter = model.base_model
    features = torch.randn(1, 3, 128 if CASES[name].get("pooling") == "last_mean" else 64)
    reading, answers = features, [(None, None)]
    if meta["encoder_type"] == "attentive":  # answers of 6 (longer than max_draft_tokens), 2 and 0 tokens
        features = torch.randn(3, 3, 64) * 50
        raw, signals = torch.randn(3, 6, 3, 64) * 50, torch.randn(3, 6, len(TOKEN_SIGNALS)) * 30
        mask = torch.arange(6)[None] < torch.tensor([6, 2, 0])[:, None]
        raw, signals = raw * mask[..., None, None], signals * mask[..., None]
        reading = Reading(features, rms_normalized(raw), mask, signals)
        answers = [(raw[i, :n].numpy(), signals[i, :n].numpy()) for i, n in enumerate([6, 2, 0])]
    with torch.no_grad():
        all_tokens = doubter.doubter_encoder["default"](reading).numpy()
        log_odds = doubter.head_log_odds(reading).numpy() if meta["confidence"] == "head" else None
    for row, (states, row_signals) in enumerate(answers):
        reference = numpy_reference.encode(written, meta, features[row].numpy(), states, row_signals)
        np.testing.assert_allclose(all_tokens[row], reference, atol=1e-5, rtol=0)
        if log_odds is not None:
            assert log_odds[row] == pytest.approx(numpy_reference.head_log_odds(written, reference), abs=1e-5)
            assert "encoder.confidence_head.weight" in written
    tokens = all_tokens[0]

    hidden = torch.randn(1, 7, 64) * 3
    layer = doubter._layers[2].doubter_ca["default"]
    gain = numpy_reference.agc_alpha(meta, step=3)
    with torch.no_grad():
        injected = layer(hidden, torch.as_tensor(tokens)[None], gain=gain)[0].numpy()
    np.testing.assert_allclose(injected, numpy_reference.cross_attention(written, meta, 2, hidden[0].numpy(), tokens,
                                                                          gain), atol=1e-4, rtol=0)
    assert (gain < 1.0) == bool(CASES[name].get("agc_enabled"))
