"""Pass 2 started at the first inject layer from cached lower-layer states equals the full pass 2 (logits and
gradients), and a cache made for another base or other sequences is refused."""

from __future__ import annotations

import datasets
import pytest
import tiny_models
import tiny_run
import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.data.prefix_states import attach_prefix_states, prefix_states
from peft_doubter.evaluation.confidence import decision_scores
from peft_doubter.training.fused_head import logit_transform, picked_log_probs
from peft_doubter.training.trainer import DoubterCollator, target_loss


CONFIG = {"target_layers": [1, 2, 3], "cross_attn_layers": [2, 3], "encoder_bottleneck_dim": 32,
          "ca_bottleneck_dim": 32, "init_weights": False, **tiny_models.TWO_PASS}


def sequences(count: int = 5, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        prompt = torch.randint(3, tiny_models.VOCAB, (4 + index,), generator=generator).tolist()
        target = torch.randint(3, tiny_models.VOCAB, (1 + index % 3,), generator=generator).tolist()
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
                     "pass1_features": torch.randn(3, 64, generator=generator).numpy(), "correct": index % 2 == 0,
                     "refusal_token": 7})
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_pass2_from_cached_lower_layers_equals_the_full_pass2(family, tmp_path):
    model = get_peft_model(tiny_models.build(family), DoubterConfig(**CONFIG)).eval()  # GPT-2's dropout off
    rows = attach_prefix_states(model, sequences(), tmp_path / "states")
    collate = DoubterCollator(pad_token_id=0)
    with_states = collate([rows[i] for i in range(len(rows))])
    plain = dict(with_states)
    del plain["prefix_hidden"]
    results = []
    for batch in (plain, with_states):
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k not in ("correct", "refusal_token")}
        loss, outputs = target_loss(model, inputs, refusal_token=batch["refusal_token"])
        (loss + outputs.refusal_log_probs.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((torch.cat([outputs.target_log_probs, outputs.refusal_log_probs]).detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-4)


def test_decision_scores_from_cached_states_equal_the_full_pass2(tmp_path):
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**CONFIG)).eval()
    tokenizer = tiny_run.tiny_tokenizer()
    prompts = ["Q: w10 w11 w12 A:", "Q: w13 A:", "Q: w14 w15 w16 w17 w18 A:"]
    rows = [{"prompt": p, "features": torch.randn(3, 64).numpy(), "answer_states": []} for p in prompts]
    targets = datasets.Dataset.from_list([{"input_ids": tokenizer(p + " w20 w21")["input_ids"]} for p in prompts])
    states = prefix_states(model, targets, tmp_path / "states")
    cached = [{**row, "prefix_hidden": states[i]["prefix_hidden"]} for i, row in enumerate(rows)]
    refusal = "w30 w31"
    full = decision_scores(model, tokenizer, rows, refusal, chat=False)
    torch.testing.assert_close(decision_scores(model, tokenizer, cached, refusal, chat=False), full, rtol=1e-4,
                               atol=1e-4)


def test_a_cache_for_another_base_or_other_sequences_is_refused(tmp_path):
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**CONFIG))
    rows = sequences()
    prefix_states(model, rows, tmp_path / "states")
    other_base = get_peft_model(tiny_models.build("llama", seed=1), DoubterConfig(**CONFIG))
    with pytest.raises(ValueError, match="built for another model.*embedding weights differ"):
        prefix_states(other_base, rows, tmp_path / "states")
    other_layers = get_peft_model(tiny_models.build("llama"), DoubterConfig(**{**CONFIG, "cross_attn_layers": [3]}))
    with pytest.raises(ValueError, match="first inject layer 2 instead of 3"):
        prefix_states(other_layers, rows, tmp_path / "states")
    with pytest.raises(ValueError, match="built for other sequences"):
        prefix_states(model, sequences(seed=1), tmp_path / "states")
    assert len(prefix_states(model, rows, tmp_path / "states")) == len(rows)  # the right one still loads


def test_an_interrupted_build_resumes_after_its_last_shard(tmp_path, monkeypatch):
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**CONFIG))
    rows = sequences(count=6)
    calls = []
    original = model.base_model.lower_layer_states

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "lower_layer_states", failing)
    with pytest.raises(KeyboardInterrupt):
        prefix_states(model, rows, tmp_path / "states", batch_size=3, shard_size=3)
    assert len(list((tmp_path / "states").glob("shard-*"))) == 1
    monkeypatch.setattr(model.base_model, "lower_layer_states", original)
    resumed = prefix_states(model, rows, tmp_path / "states", batch_size=3, shard_size=3)
    fresh = prefix_states(model, rows, tmp_path / "fresh", batch_size=3, shard_size=3)
    for index in range(len(rows)):
        assert resumed[index]["prefix_hidden"] == fresh[index]["prefix_hidden"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "mistral"])
def test_target_loss_on_the_supervised_positions_equals_the_full_logits_loss(family):
    base = tiny_models.build(family)
    if family == "gemma3":
        base.config.final_logit_softcapping = 2.0  # the LM head's soft cap (Gemma 2's 30 would barely bite here)
    model = get_peft_model(base, DoubterConfig(**CONFIG)).eval()
    batch = DoubterCollator(pad_token_id=0)(list(sequences(count=6)))
    inputs = {k: v for k, v in batch.items() if k not in ("correct", "refusal_token")}
    refusal = torch.tensor([7, 9, 11, 7, 9, 11])
    loss, outputs = target_loss(model, inputs, refusal_token=refusal)
    (loss + outputs.refusal_log_probs.square().sum()).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    labels = inputs["labels"]
    full = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[:, :-1].log_softmax(-1)
    shifted = labels[:, 1:]
    reference = -full[shifted != -100].gather(1, shifted[shifted != -100][:, None]).mean()
    prompt_end = int((labels != -100).int().argmax(1).min()) - 1  # prompts are aligned to end in one column
    refusal_log_probs = full[torch.arange(len(refusal)), prompt_end, refusal]
    (reference + refusal_log_probs.square().sum()).backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.refusal_log_probs, refusal_log_probs, rtol=1e-5, atol=1e-5)
    assert fused
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("scale", "softcap", "bias"), [(1.0, None, False), (0.25, None, True), (1.0, 3.0, False),
                                                        (2.0, 5.0, True)])
def test_picked_log_probs_equal_the_full_log_softmax(scale, softcap, bias):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=2.0, generator=generator)
    hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
    picks = torch.randint(0, 50, (9, 3), generator=generator)
    weights = torch.randn(9, 3, generator=generator)
    fused = picked_log_probs(hidden, head, picks, scale, softcap, chunk_columns=7)
    (fused * weights).sum().backward()
    fused_grad, hidden.grad = hidden.grad, None
    logits = head(hidden) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    full = logits.log_softmax(-1).gather(1, picks)
    (full * weights).sum().backward()
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation skips the gradient's product, not the values
        torch.testing.assert_close(picked_log_probs(hidden, head, picks, scale, softcap, chunk_columns=7), full)
    with pytest.raises(ValueError, match="must be frozen"):
        picked_log_probs(hidden, head.requires_grad_(True), picks)


def test_logit_transform_follows_the_family_config():
    from transformers import CohereConfig, Gemma3TextConfig, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == (1.0, None)
    assert logit_transform(Gemma3TextConfig(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)
