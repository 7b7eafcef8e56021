"""Prompt formats, exemplar leaks, left truncation, chat templates and cloze option scoring."""

import dataclasses

import pytest
import tiny_models
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_doubter.data.prompts import (
    Prompt,
    PromptConfig,
    build_prompt,
    cloze_pairs,
    first_line,
    format_choices,
    score_cloze_batch,
    score_cloze_options,
)


WORDS = ["Q:", "A:", "Question:", "Answer:", "A.", "B.", "C.", "capital", "of", "France?", "Germany?", "Italy?", "Paris", "Berlin", "Rome", "red", "blue", "sky"]
QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def row(i: int, question: str, answer: str) -> dict:
    return {"id": f"t/{i}", "question": question, "answers": [answer], "choices": [], "label": -1, "subject": ""}


POOL = [row(1, "capital of Germany?", "Berlin"), row(2, "capital of Italy?", "Rome")]
QUESTION = row(0, "capital of France?", "Paris")
MC = {"id": "m/0", "question": "sky", "answers": ["blue"], "choices": ["red", "blue"], "label": 1, "subject": ""}


def test_prompt_config_fields_have_help_and_validate():
    assert [f.name for f in dataclasses.fields(PromptConfig)] == ["style", "k_shot", "mc_format", "max_prompt_tokens"]
    assert all(f.metadata.get("help") for f in dataclasses.fields(PromptConfig))
    with pytest.raises(ValueError, match="style"):
        PromptConfig(style="raw")
    with pytest.raises(ValueError, match="k_shot"):
        PromptConfig(k_shot=-1)


def test_few_shot_open_qa_completion(tokenizer):
    prompt = build_prompt(QUESTION, tokenizer, PromptConfig(k_shot=5), POOL)
    assert prompt == Prompt(
        "Q: capital of Germany?\nA: Berlin\n\nQ: capital of Italy?\nA: Rome\n\nQ: capital of France?\nA:", False, 2
    )
    assert build_prompt(QUESTION, tokenizer, PromptConfig(k_shot=1), POOL).text.count("Q:") == 2
    assert first_line(" Paris\n\nQ: capital of Italy?") == "Paris"


def test_exemplar_leak_is_refused(tokenizer):
    with pytest.raises(ValueError, match="leaks question 't/0'"):
        build_prompt(QUESTION, tokenizer, PromptConfig(), [POOL[0], QUESTION])
    same_text = row(9, "Capital of  France", "Paris")  # other id, same normalized question
    with pytest.raises(ValueError, match="leaks"):
        build_prompt(QUESTION, tokenizer, PromptConfig(), [same_text])


def test_multiple_choice_formats(tokenizer):
    text = build_prompt(MC, tokenizer, PromptConfig(k_shot=0)).text
    assert text == "Question: sky\nA. red\nB. blue\nAnswer:"
    shot = dict(MC, id="m/1", question="capital of France?", choices=["Paris", "Rome"], label=0)
    assert build_prompt(MC, tokenizer, PromptConfig(), [shot]).text.startswith(
        "Question: capital of France?\nA. Paris\nB. Rome\nAnswer: A\n\n"
    )
    assert format_choices(["x", "y", "z"]) == "A. x\nB. y\nC. z"
    cloze = PromptConfig(mc_format="cloze")
    expected = "Question: capital of France?\nAnswer: Paris\n\nQuestion: sky\nAnswer:"
    assert build_prompt(MC, tokenizer, cloze, [shot]).text == expected


def test_cloze_pairs():
    prompt = "Question: sky\nAnswer:"
    assert cloze_pairs(prompt, ["red", "blue"]) == [(prompt, " red"), (prompt, " blue")]
    assert cloze_pairs("<|im_start|>assistant\n", ["red"]) == [("<|im_start|>assistant\n", "red")]


def test_left_truncation_drops_exemplars_then_question_start(tokenizer):
    full = build_prompt(QUESTION, tokenizer, PromptConfig(max_prompt_tokens=None), POOL)
    n_full = len(tokenizer(full.text)["input_ids"])
    with pytest.warns(UserWarning, match="truncated"):
        fewer = build_prompt(QUESTION, tokenizer, PromptConfig(max_prompt_tokens=n_full - 1), POOL)
    assert fewer.truncated and fewer.n_exemplars == 1
    assert fewer.text == "Q: capital of Italy?\nA: Rome\n\nQ: capital of France?\nA:"
    with pytest.warns(UserWarning):
        cut = build_prompt(QUESTION, tokenizer, PromptConfig(max_prompt_tokens=3), POOL)
    assert cut == Prompt("of France?\nA:", True, 0)  # the question's end and the answer cue survive
    assert len(tokenizer(cut.text)["input_ids"]) <= 3
    with pytest.warns(UserWarning):
        prompts = [build_prompt(QUESTION, tokenizer, PromptConfig(max_prompt_tokens=m), POOL) for m in (3, 100)]
    assert sum(p.truncated for p in prompts) == 1


def test_chat_prompts_use_the_template(tokenizer):
    tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    try:
        text = build_prompt(QUESTION, tokenizer, PromptConfig(style="chat", k_shot=1), POOL).text
        assert text.startswith("<|im_start|>user\nAnswer the question with a short answer only")
        assert "capital of Germany?<|im_end|>\n<|im_start|>assistant\nBerlin<|im_end|>" in text
        assert text.endswith("capital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
        tokenizer.chat_template = PLAIN_TEMPLATE  # templates without enable_thinking ignore it
        text = build_prompt(MC, tokenizer, PromptConfig(style="chat", k_shot=0)).text
        assert text == "[user] Answer with the letter of the correct option only.\n\nsky\nA. red\nB. blue\n[assistant]"
    finally:
        tokenizer.chat_template = None


@pytest.fixture(scope="module")
def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).train()  # dropout state must be restored after scoring


def reference_logprob(model, ids: list[int], n_cont: int) -> float:
    logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return logprobs[-n_cont:].sum().item()


def test_score_cloze_options_matches_unbatched_reference(tokenizer, tiny_llama):
    prompt = "<s> Question: capital of France? Answer:"
    options = ["Paris", "Berlin Rome Paris", "Rome Rome"]
    raw = score_cloze_options(tiny_llama, tokenizer, prompt, options, normalize=None)
    context = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        tiny_llama.eval()
        expected = [
            reference_logprob(tiny_llama, context + tokenizer(" " + o)["input_ids"], len(o.split())) for o in options
        ]
        tiny_llama.train()
    assert raw == pytest.approx(expected, abs=1e-4)
    per_token = score_cloze_options(tiny_llama, tokenizer, prompt, options, normalize="token")
    assert per_token == pytest.approx([e / len(o.split()) for e, o in zip(expected, options)], abs=1e-4)
    per_char = score_cloze_options(tiny_llama, tokenizer, prompt, options, normalize="char")
    assert per_char == pytest.approx([e / len(" " + o) for e, o in zip(expected, options)], abs=1e-4)
    assert tiny_llama.training
    with pytest.raises(ValueError, match="normalize"):
        score_cloze_options(tiny_llama, tokenizer, prompt, options, normalize="byte")


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_batched_cloze_scoring_equals_one_question_at_a_time(tokenizer, family):
    """One prompt pass for the batch and the options on copies of its KV cache give each question's scores as
    `score_cloze_options` does, for prompts of different lengths (left-padded), option counts and lengths, and
    continuations split across forward chunks."""
    model = tiny_models.build(family)
    prompts = ["<s> Question: capital of France? Answer:", "<s> Q: sky Question: capital of Italy? Answer:",
               "<s> Answer:"]
    options = [["Paris", "Berlin Rome Paris", "Rome Rome"], ["red", "blue sky"], ["Rome", "Paris", "Berlin", "red"]]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    for normalize in ("token", "char", None):
        batched = score_cloze_batch(model, tokenizer, inputs, prompts, options, normalize=normalize, chunk_size=2)
        for prompt, row_options, scores in zip(prompts, options, batched):
            alone = score_cloze_options(model, tokenizer, prompt, row_options, normalize=normalize)
            assert scores == pytest.approx(alone, abs=1e-4)
    assert len({round(s, 3) for s in batched[0]}) == 3, "the options get different scores"


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_reading_given_answers_after_the_prompt_pass_equals_the_full_reading(tokenizer, family):
    """Reading the chosen options on a copy of the cloze prompt pass's KV cache (collection's path, no second prompt
    pass) gives the reading of prompt + option in one forward: last-token features, every answer token's states and
    teacher-forced signals, for left-padded prompts and answers of different lengths."""
    from peft import get_peft_model

    from peft_doubter import DoubterConfig
    from peft_doubter.data.prompts import cloze_option_ids, prompt_pass_of

    model = get_peft_model(tiny_models.build(family), DoubterConfig(target_layers=[1, 3], encoder_bottleneck_dim=32,
                                                                    ca_bottleneck_dim=32)).eval()
    doubter = model.base_model
    prompts = ["<s> Question: capital of France? Answer:", "<s> Q: sky Question: capital of Italy? Answer:"]
    answers = [cloze_option_ids(tokenizer, prompt, [option])[0]
               for prompt, option in zip(prompts, ["Berlin Rome Paris", "red"])]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), model.disable_adapter():
        prompt_pass = prompt_pass_of(doubter.model, inputs)
        continued = doubter.read_given_answers(inputs["input_ids"], inputs["attention_mask"], answers, prompt_pass)
        full = doubter.read_given_answers(inputs["input_ids"], inputs["attention_mask"], answers)
    assert continued.answer_mask.tolist() == full.answer_mask.tolist() and max(map(len, answers)) > 1
    for name in ("features", "answer_states", "token_signals"):
        torch.testing.assert_close(getattr(continued, name), getattr(full, name), rtol=1e-4, atol=1e-4, msg=name)

