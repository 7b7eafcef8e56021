"""Answer normalization, exact match over aliases, letters, refusals and corrections."""

import pytest

from peft_doubter.scoring import (
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
