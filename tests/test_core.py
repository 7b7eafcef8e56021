"""The Doubter tuner on tiny models of every supported family, PEFT-style: a table of cases, shared checks."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import peft_doubter
from peft_doubter import DoubterConfig, DoubterLayer
from peft_doubter.tuner.capture import rms_normalized


SMALL = {"encoder_bottleneck_dim": 32, "ca_bottleneck_dim": 32, **tiny_models.TWO_PASS}
CONFIGS = {
    "selective-last": {"target_layers": [1, 2, 3], "cross_attn_layers": [2, 3]},
    "multi_token-mean": {"target_layers": "late", "encoder_type": "multi_token", "num_cognitive_tokens": 3, "pooling": "mean"},
    "transformer-last_mean": {"target_layers": [0, 2], "cross_attn_layers": [1, 3], "encoder_type": "transformer",
                                  "pooling": "last_mean"},
    "dynamic-gates-all": {"target_layers": "all", "dynamic_gates": True},
}
TEST_CASES = [(family, "selective-last") for family in tiny_models.FAMILIES] + [
    ("llama", name) for name in CONFIGS if name != "selective-last"
] + [("gemma3", "transformer-last_mean"), ("gpt2", "multi_token-mean")]


def make(family: str, config_name: str, seed: int = 0, **overrides):
    base = tiny_models.build(family, seed)
    return get_peft_model(base, DoubterConfig(**{**SMALL, **CONFIGS[config_name], **overrides}))


def perturb(model) -> None:
    """Make the wrapper change the logits clearly."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "doubter_" in name:
                param.add_(torch.randn_like(param) * 0.2)
            if name.endswith("doubter_ca.default.gate"):
                param.fill_(1.0)


def prompts(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_models.VOCAB, (batch, length), generator=generator)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


cases = pytest.mark.parametrize("family,config_name", TEST_CASES, ids=[f"{f}-{c}" for f, c in TEST_CASES])


@cases
def test_forward_and_generate_run(family, config_name):
    model = make(family, config_name)
    ids = prompts()
    assert logits(model, ids).shape == (2, 10, tiny_models.VOCAB)
    out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 13) and torch.equal(out[:, :10], ids)


@cases
def test_only_wrapper_gets_gradients(family, config_name):
    model = make(family, config_name)
    model.train()
    ids = prompts()
    labels = ids.clone()
    labels[:, :6] = -100
    model(input_ids=ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        is_wrapper = "doubter_" in name
        assert param.requires_grad == is_wrapper, name
        if is_wrapper:
            assert param.grad is not None, f"no gradient reached {name}"
        else:
            assert param.grad is None, name
    wrapper_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "doubter_" in n]
    assert sum(wrapper_grads) > 0


@cases
def test_disable_unload_and_save_load_roundtrip(family, config_name, tmp_path):
    base = tiny_models.build(family)
    ids = prompts()
    reference = logits(base, ids)
    untouched = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, DoubterConfig(**{**SMALL, **CONFIGS[config_name]}))
    perturb(model)
    adapted = logits(model, ids)
    assert (adapted - reference).abs().max() > 1e-3, "the perturbed wrapper should change the logits"
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), reference)
    assert torch.allclose(logits(model, ids), adapted)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "adapter").glob("*.bin"))

    for name in ("default", "other"):
        fresh = PeftModel.from_pretrained(tiny_models.build(family), tmp_path / "adapter", adapter_name=name)
        assert fresh.active_adapter == name
        torch.testing.assert_close(logits(fresh, ids), adapted, rtol=0, atol=1e-5)

    unloaded = model.unload()
    assert not any(isinstance(m, DoubterLayer) for m in unloaded.modules())
    assert torch.equal(logits(unloaded, ids), reference)
    assert all(torch.equal(untouched[k], v) for k, v in unloaded.state_dict().items())


def test_auto_peft_model_loads_from_local_directory(tmp_path):
    tiny_models.build("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, DoubterConfig(**SMALL, target_layers=[1, 2]))
    perturb(model)
    ids = prompts()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert PeftConfig.from_pretrained(tmp_path / "adapter").peft_type == peft_doubter.DOUBTER_PEFT_TYPE
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)


@cases
def test_left_and_right_padding_read_the_same_prompt_token(family, config_name):
    model = make(family, config_name)
    perturb(model)
    short, long = prompts(1, 6, seed=1), prompts(1, 9, seed=2)
    singles = [logits(model, short)[0], logits(model, long)[0]]
    pad = torch.zeros(1, 3, dtype=torch.long)
    for side in ("left", "right"):
        padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
        ids = torch.cat([padded, long])
        mask = (torch.arange(9) >= 3) if side == "left" else (torch.arange(9) < 6)
        mask = torch.stack([mask, torch.ones(9, dtype=torch.bool)]).long()
        batched = logits(model, ids, attention_mask=mask)
        real = slice(3, 9) if side == "left" else slice(0, 6)
        torch.testing.assert_close(batched[0, real], singles[0], rtol=0, atol=2e-4)
        torch.testing.assert_close(batched[1], singles[1], rtol=0, atol=2e-4)


@cases
def test_prefix_reuse_equals_naive_two_pass(family, config_name):
    model = make(family, config_name)
    perturb(model)
    ids = prompts(2, 12)
    torch.testing.assert_close(logits(model, ids), logits(model, ids, reuse_prefix=False), rtol=0, atol=1e-5)
    fast, naive = (
        model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                       return_dict_in_generate=True, reuse_prefix=reuse)
        for reuse in (True, False)
    )
    assert torch.equal(fast.sequences, naive.sequences)
    for a, b in zip(fast.scores, naive.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def _count_block_calls(model, layer_index: int) -> list[int]:
    layers = model.base_model._layers
    block = layers[layer_index]
    block = block.get_base_layer() if isinstance(block, DoubterLayer) else block
    first_child = next(block.children())
    calls = [0]
    first_child.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_pass1_stops_early_and_pass2_skips_the_prefix():
    model = make("llama", "selective-last", target_layers=[1], cross_attn_layers=[2, 3])
    bottom, top = _count_block_calls(model, 0), _count_block_calls(model, 3)
    logits(model, prompts())
    assert bottom == [1], "layer 0 runs once (pass 1); pass 2 reuses its output"
    assert top == [1], "layer 3 runs once (pass 2); pass 1 stops after layer 1"
    logits(model, prompts(), reuse_prefix=False)
    assert bottom == [3] and top == [2]


def test_target_tokens_never_reach_pass1():
    model = make("llama", "transformer-last_mean")
    captured = []
    encoder = model.base_model.doubter_encoder["default"]
    encoder.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    ids = prompts(1, 10)
    labels = torch.full_like(ids, -100)
    labels[:, 6:] = ids[:, 6:]
    other = ids.clone()
    other[:, 6:] = (other[:, 6:] + 7) % tiny_models.VOCAB
    model(input_ids=ids, labels=labels)
    model(input_ids=other, labels=labels)
    assert torch.equal(captured[0], captured[1])
    model(input_ids=ids[:, :6])
    torch.testing.assert_close(captured[2], captured[0], rtol=0, atol=1e-5)


def test_precomputed_pass1_features_skip_pass1():
    model = make("llama", "selective-last")
    perturb(model)
    ids = prompts()
    features = model.base_model.run_pass1(ids, torch.ones_like(ids), torch.full((2,), 9)).stacked()
    bottom = _count_block_calls(model, 0)
    from_cache = logits(model, ids, pass1_features=features)
    assert bottom == [1], "with cached features only pass 2 runs"
    torch.testing.assert_close(from_cache, logits(model, ids), rtol=0, atol=1e-5)


def test_batched_left_padded_generation_matches_one_by_one():
    model = make("gemma3", "selective-last")
    perturb(model)
    rows = [prompts(1, 5, seed=3), prompts(1, 9, seed=4)]
    singles = [model.generate(input_ids=r, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, r.shape[1]:] for r in rows]
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), rows[0]], 1), rows[1]])
    mask = torch.stack([torch.arange(9) >= 4, torch.ones(9, dtype=torch.bool)]).long()
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, single in enumerate(singles):
        assert torch.equal(batched[row, 9:], single)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_answer_read_position_drafts_then_reads_prompt_plus_draft(family):
    """read_position='answer': pass 1 drafts the base's own greedy answer (adapter off) and reads its last token;
    pass 2 generates from the prompt alone with those cognitive tokens. Checked against doing it by hand."""
    model = make(family, "selective-last", read_position="answer", max_draft_tokens=5)
    perturb(model)
    doubter = model.base_model
    rows = [prompts(1, 5, seed=3), prompts(1, 9, seed=4)]
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), rows[0]], 1), rows[1]])
    mask = torch.stack([torch.arange(9) >= 4, torch.ones(9, dtype=torch.bool)]).long()
    stop = int(ids[1, -1])  # some row may stop early on this token
    with model.disable_adapter(), torch.no_grad():
        plain = [model.generate(input_ids=r, max_new_tokens=5, do_sample=False, eos_token_id=stop, pad_token_id=0)
                 for r in rows]
    expected_drafts = []
    for row, out in zip(rows, plain):
        tokens = out[0, row.shape[1]:].tolist()
        expected_drafts.append(tokens[: tokens.index(stop)] if stop in tokens else tokens)
    draft = doubter.draft(ids, mask, 5, eos_token_id=stop, pad_token_id=0)
    assert draft.tokens == expected_drafts
    # What the draft's decoding steps recorded equals pass 1 over each unpadded prompt + draft: at the last token
    # (the reading), at every answer token (its states, RMS-normalised) and the tokens' log-probabilities.
    features = draft.reading.features
    torch.testing.assert_close(features, doubter.read_answers(ids, mask, expected_drafts).stacked(), rtol=0, atol=1e-4)
    for index, (row, tokens) in enumerate(zip(rows, expected_drafts)):
        full = torch.cat([row[0], torch.as_tensor(tokens, dtype=torch.long)])[None]
        alone = doubter.run_pass1(full, torch.ones_like(full), torch.tensor([full.shape[1] - 1]),
                                  keep_prefix=False).stacked()
        torch.testing.assert_close(features[index], alone[0], rtol=0, atol=1e-4)
        assert draft.reading.answer_mask[index].sum() == len(tokens)
        with model.disable_adapter(), torch.no_grad():
            logprobs = model(input_ids=full).logits[0].log_softmax(-1)
        for position, token in enumerate(tokens):
            state = doubter.run_pass1(full[:, : row.shape[1] + position + 1], torch.ones_like(full)[:, : row.shape[1]
                                      + position + 1], torch.tensor([row.shape[1] + position]),
                                      keep_prefix=False).stacked()[0]
            torch.testing.assert_close(draft.reading.answer_states[index, position], rms_normalized(state),
                                       rtol=0, atol=1e-4)
            expected = logprobs[row.shape[1] + position - 1, token]
            torch.testing.assert_close(draft.reading.token_signals[index, position, 0], expected, rtol=0, atol=1e-4)
    # Generation = pass 2 from the prompt with those features; it differs from reading the prompt.
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "eos_token_id": stop, "pad_token_id": 0,
                  "output_logits": True, "return_dict_in_generate": True}
    generated = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, pass1_features=features).logits[:, -1]
    torch.testing.assert_close(generated.logits[0], first, rtol=0, atol=1e-4)
    model.peft_config["default"].read_position = "prompt"
    from_prompt = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert (from_prompt.logits[0] - generated.logits[0]).abs().max() > 1e-4
    model.peft_config["default"].read_position = "answer"
    with pytest.raises(ValueError, match="pass `pass1_features`"):
        model(input_ids=ids, attention_mask=mask)
    from peft_doubter.deploy.sidecar import doubter_tensors

    metadata = doubter_tensors(model)[1]  # llama.cpp reads answers too: the sidecar says so and how long to draft
    assert (metadata["read_position"], metadata["max_draft_tokens"]) == ("answer", 5)
    model.peft_config["default"].pooling = "mean"
    with pytest.raises(ValueError, match="no llama.cpp implementation"):
        doubter_tensors(model)


class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.flatten())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_prompt_then_each_new_token():
    model = make("llama", "selective-last")
    ids = prompts(1, 7)
    streamer = _Collect()
    out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks), out[0])


def test_agc_and_dynamic_refresh_are_opt_in_and_change_decoding():
    model = make("llama", "selective-last")
    perturb(model)
    ids = prompts(1, 8)
    kwargs = {"input_ids": ids, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    plain = model.generate(**kwargs).scores
    model.peft_config["default"].agc_tau = 1.0
    damped = model.generate(**kwargs, agc=True).scores
    torch.testing.assert_close(damped[0], plain[0], rtol=0, atol=1e-5)  # step 0: full gain
    assert (damped[-1] - plain[-1]).nan_to_num().abs().max() > 1e-4  # later steps: gain decayed towards the floor
    model.peft_config["default"].refresh_interval = 1
    model.peft_config["default"].refresh_threshold = 1.0  # always counts as drift: re-encode every step
    refreshed = model.generate(**kwargs, dynamic_refresh=True).scores
    torch.testing.assert_close(refreshed[0], plain[0], rtol=0, atol=1e-5)
    assert (refreshed[-1] - plain[-1]).nan_to_num().abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        base = tiny_models.build("qwen2")
        if checkpointing:
            base.gradient_checkpointing_enable()
        model = get_peft_model(base, DoubterConfig(**SMALL, target_layers=[1, 2, 3]))
        model.train()
        ids = prompts()
        labels = ids.masked_fill(torch.arange(10) < 5, -100)
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_wrong_base_is_refused_unless_overridden(tmp_path):
    model = make("llama", "selective-last")
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert saved.base_fingerprint["model_type"] == "llama" and saved.base_fingerprint["num_layers"] == 4
    other_weights = tiny_models.build("llama", seed=1)
    with pytest.raises(ValueError, match="different base model.*embedding weights differ"):
        PeftModel.from_pretrained(other_weights, tmp_path)
    with pytest.raises(ValueError, match="model_type: adapter has 'llama', base has 'qwen2'"):
        PeftModel.from_pretrained(tiny_models.build("qwen2"), tmp_path)
    saved.check_base_fingerprint = False
    with pytest.warns(UserWarning, match="differs from its own"):
        PeftModel.from_pretrained(tiny_models.build("llama", seed=1), tmp_path, config=saved)
    PeftModel.from_pretrained(tiny_models.build("llama").to(torch.bfloat16), tmp_path)  # same weights, other dtype


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_layers": [7]}, r"`target_layers` contains layer index 7.*4 decoder layers"),
        ({"target_layers": [1], "cross_attn_layers": [-5]}, r"`cross_attn_layers` contains layer index -5"),
        ({"target_layers": [1, -3]}, r"`target_layers` names the same layer twice"),
        ({"encoder_type": "selective", "num_cognitive_tokens": 5, "target_layers": [1, 2]},
         r"`num_cognitive_tokens` \(5\) must equal the number of read layers \(2\)"),
    ],
)
def test_bad_layers_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_models.build("llama"), DoubterConfig(**{**SMALL, **kwargs}))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_layers": "early"}, "`target_layers` must be a list of layer indices, 'all' or 'late'"),
        ({"target_layers": []}, "`target_layers` must be a non-empty list"),
        ({"target_layers": [1, 1]}, "`target_layers` contains duplicate"),
        ({"cross_attn_layers": [1.5]}, "`cross_attn_layers` must contain only integers"),
        ({"encoder_type": "mlp"}, "`encoder_type` must be one of"),
        ({"pooling": "max"}, "`pooling` must be one of"),
        ({"ca_bottleneck_dim": 30, "ca_num_heads": 4}, r"`ca_bottleneck_dim` \(30\) must be divisible by `ca_num_heads`"),
        ({"ca_num_heads": 0}, "`ca_num_heads` must be a positive integer"),
        ({"agc_floor": 1.5}, "`agc_floor` must lie in"),
        ({"agc_tau": 0}, "`agc_tau` must be > 0"),
        ({"refresh_threshold": 2}, "`refresh_threshold` is a cosine similarity"),
        ({"correction_ratio": -0.1}, "`correction_ratio` must lie in"),
        ({"task_type": "SEQ_CLS"}, "`task_type` must be 'CAUSAL_LM'"),
        ({"refusal_text": "  "}, "`refusal_text` must not be empty"),
        ({"read_position": "draft"}, "`read_position` must be one of"),
        ({"max_draft_tokens": 0}, "`max_draft_tokens` must be a positive integer"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DoubterConfig(**kwargs)


def test_bad_prompts_give_clear_errors():
    model = make("llama", "selective-last")
    with pytest.raises(ValueError, match="Empty prompt"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="Empty prompt"):
        model(input_ids=prompts(1, 4), attention_mask=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the base model's context \\(256 tokens\\)"):
        model.generate(input_ids=prompts(1, 300), max_new_tokens=2)
    right_padded = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="needs left padding"):
        model.generate(input_ids=prompts(1, 3), attention_mask=right_padded, max_new_tokens=2)
    labels = torch.full((1, 4), -100)
    with pytest.raises(ValueError, match="at least one supervised token"):
        model(input_ids=prompts(1, 4), labels=labels)


def test_merge_is_refused_and_points_to_unload():
    model = make("llama", "selective-last")
    with pytest.raises(NotImplementedError, match=r"unload\(\)"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match=r"unload\(\)"):
        model.merge_adapter()


def test_two_adapters_switch_and_delete():
    model = make("llama", "selective-last")
    perturb(model)
    model.add_adapter("second", DoubterConfig(**SMALL, target_layers=[0, 3]))
    ids = prompts()
    first = logits(model, ids)
    model.set_adapter("second")
    assert not torch.allclose(logits(model, ids), first)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), first, rtol=0, atol=0)
    model.delete_adapter("second")
    assert "second" not in model.base_model.doubter_encoder


def test_non_decoder_model_lists_what_was_found():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=100))
    with pytest.raises(ValueError, match=r"Could not find the decoder blocks.*found: none"):
        get_peft_model(bert, DoubterConfig(**SMALL, target_layers=[0]))


def test_late_means_upper_third():
    assert peft_doubter.tuner.config.resolve_layers("target_layers", "late", 18) == list(range(12, 18))
    assert peft_doubter.tuner.config.resolve_layers("target_layers", "late", 32) == list(range(21, 32))
    assert peft_doubter.tuner.config.resolve_layers("target_layers", [-1, 0], 4) == [0, 3]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_draft_shares_the_prompt_prefix_and_drops_finished_rows(family):
    """`draft` computes the prompts' common prefix once and lets finished rows leave the batch; each row still gets
    exactly greedy `generate`'s answer, and the read states of a full forward over its prompt + answer. (The tiny
    Gemmas' 6-token sliding window is shorter than these prompts: `draft` shares no prefix there.)"""
    model = make(family, "selective-last", read_position="answer", max_draft_tokens=6)
    doubter = model.base_model
    for seed in range(11, 40):  # a prefix whose first row's answer has a token not seen before its third position
        prefix = prompts(1, 7, seed=seed)[0]
        rows = [torch.cat([prefix, prompts(1, n, seed=seed + n)[0]]) for n in (3, 5, 4)]
        with model.disable_adapter(), torch.no_grad():
            free = [model.generate(input_ids=r[None], max_new_tokens=7, do_sample=False, pad_token_id=0)[0, len(r):]
                    for r in rows]
        first = free[0].tolist()
        position = next((i for i in range(2, min(6, len(first))) if first[i] not in first[:i]), None)
        if position is None:
            continue
        stop = first[position]  # row 0 stops after `position` tokens
        lengths = [(t.tolist()[:6] + [stop]).index(stop) for t in free]
        if max(lengths) > position:  # another row decodes on after row 0 has left the batch
            break
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, 12 - len(row):], mask[index, 12 - len(row):] = row, 1
    draft = doubter.draft(ids, mask, 6, eos_token_id=stop, pad_token_id=0)
    for index, row in enumerate(rows):
        with model.disable_adapter(), torch.no_grad():
            out = model.generate(input_ids=row[None], max_new_tokens=6, do_sample=False, eos_token_id=stop,
                                 pad_token_id=0)[0, len(row):].tolist()
        expected = out[: out.index(stop)] if stop in out else out
        assert draft.tokens[index] == expected
        full = torch.cat([row, torch.as_tensor(expected, dtype=torch.long)])[None]
        alone = doubter.run_pass1(full, torch.ones_like(full), torch.tensor([full.shape[1] - 1]),
                                  keep_prefix=False).stacked()[0]
        torch.testing.assert_close(draft.reading.features[index], alone, rtol=0, atol=1e-4)
    assert len(draft.tokens[0]) == position and max(len(t) for t in draft.tokens) > position
