"""Answer normalization, exact match over aliases, letters, refusals and corrections."""

import pytest

from peft_doubter.data.scoring import (
    DEFAULT_REFUSAL,
    ContainmentJudge,
    ExactMatchJudge,
    Judge,
    exact_match,
    extract_correction,
    extract_letter,
    is_correction,
    is_refusal,
    normalize_answer,
)


def test_normalize_answer():
    assert normalize_answer("  The  Sunset Blvd.! ") == "sunset blvd"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # 'the' only as a whole word


@pytest.mark.parametrize(
    "prediction, expected",
    [("sunset boulevard", True), ("The Sunset Blvd.", True), ("West Sunset Boulevard", True),
     ("Sunset", False), ("Sunset Boulevard is the answer", False), ("", False)],
)
def test_exact_match_over_aliases(prediction, expected):
    assert exact_match(prediction, ["Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard"]) is expected


@pytest.mark.parametrize(
    "text, expected",
    [("B", 1), ("B)", 1), ("(B)", 1), (" b.", 1), ("Answer: B", 1), ("The answer is (c).", 2),
     ("D. Paris", 3), ("answer:\n a", 0), ("E", None), ("a dog", None), ("I think so", None), ("", None)],
)
def test_extract_letter(text, expected):
    assert extract_letter(text, 4) == expected


def test_refusal_is_the_refusal_sentence_not_any_different_text():
    assert is_refusal(DEFAULT_REFUSAL)
    assert is_refusal("  i’m NOT confident enough to answer this question accurately\n\nQ: next")
    assert not is_refusal("London")  # a wrong answer is not a refusal
    assert not is_refusal("I'm not confident")  # an unfinished sentence is not the refusal
    assert not is_refusal("Paris. " + DEFAULT_REFUSAL)
    assert is_refusal("I cannot say.", refusal_text="I cannot say")


def test_correction():
    text = "Wait, the correct answer is Sunset Boulevard.\nQ: next"
    assert is_correction(text) and extract_correction(text) == "Sunset Boulevard"
    assert extract_correction("wait the correct answer is: 42") == "42"
    assert not is_correction("Sunset Boulevard") and extract_correction("Sunset Boulevard") is None
    assert not is_correction("Wait, the correct answer is")


def test_judges():
    judges: list[Judge] = [ExactMatchJudge(), ContainmentJudge()]
    em, contain = judges
    answers = ["Paris"]
    assert em("Capital?", "paris.", answers) and contain("Capital?", "paris.", answers)
    assert not em("Capital?", "It is Paris, France", answers)
    assert contain("Capital?", "It is Paris, France", answers)
    assert not contain("Capital?", "Parisian", answers)  # word boundaries
    assert not contain("Q?", "anything", ["", "the"])  # empty normalized aliases never match


def _judge_model(tmp_path):
    """A tiny random Llama with a word-level chat tokenizer that knows yes/no."""
    import tiny_models
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "yes", "Yes", "no", "No"]
    words += [f"w{i}" for i in range(tiny_models.VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} w5{% endif %}")
    model = tiny_models.build("llama")
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    return model, tokenizer


def test_local_model_judge_asks_the_model_only_when_exact_match_fails(tmp_path):
    from peft_doubter.data.collection import make_judge
    from peft_doubter.data.scoring import LocalModelJudge

    model, tokenizer = _judge_model(tmp_path)
    judge = LocalModelJudge(model, tokenizer)
    calls = []
    bias = {"yes": 0.0}

    def steer(module, args, output):  # push the next-token logits towards yes (or no)
        calls.append(1)
        output = output.clone()
        output[..., judge.yes_ids] += bias["yes"]
        return output

    model.lm_head.register_forward_hook(steer)
    assert judge("Q", "The Beatles", ["the beatles"]) and not calls  # exact match: no model call
    assert not judge("Q", "  ", ["w1"]) and not calls  # empty prediction
    bias["yes"] = 50.0
    assert judge.probability("Q", "w7", ["w8"]) > 0.99 and judge("Q", "w7", ["w8"])
    bias["yes"] = -50.0
    assert judge.probability("Q", "w7", ["w8"]) < 0.01 and not judge("Q", "w7", ["w8"])
    # The same number as the model's own next-token distribution.
    bias["yes"] = 0.0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Question: Q\nReference answers: w8\n"
                                          "Candidate answer: w7\nDoes the candidate answer mean the same as one of "
                                          "the reference answers? Answer yes or no."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    probs = model(**ids).logits[0, -1].softmax(-1)
    yes, no = probs[judge.yes_ids].sum(), probs[judge.no_ids].sum()
    assert judge.probability("Q", "w7", ["w8"]) == pytest.approx(float(yes / (yes + no)), abs=1e-6)
    assert isinstance(make_judge(f"model:{tmp_path / 'judge'}"), LocalModelJudge)


def test_judge_specs_are_checked():
    from peft_doubter.data.collection import CollectConfig, make_judge
    from peft_doubter.data.scoring import ContainmentJudge, LocalModelJudge

    assert isinstance(make_judge("containment"), ContainmentJudge)
    for bad in ("model:", "gpt4", "model:  "):
        with pytest.raises(ValueError, match="`judge` must be one of"):
            CollectConfig(judge=bad)
    import tiny_run

    with pytest.raises(ValueError, match="chat model"):
        LocalModelJudge(None, tiny_run.tiny_tokenizer())
    tokenizer = tiny_run.tiny_tokenizer()
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="cannot tell 'yes' from 'no'"):
        LocalModelJudge(None, tokenizer)
