"""Answer scoring: normalized exact match over aliases, letter extraction, refusals and corrections.

Correctness is judged against the gold answers, never by "the text differs from the answer": a response
is a refusal only if it *is* the refusal sentence (:func:`is_refusal`), a correction only if it starts with
the correction prefix (:func:`is_correction`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Protocol

from ..names import CORRECTION_PREFIX, DEFAULT_REFUSAL


_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalized prediction equals any normalized gold alias."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether any non-empty normalized gold alias occurs, on word boundaries, in the normalized prediction."""
    pred = f" {normalize_answer(prediction)} "
    return any(norm and f" {norm} " in pred for norm in map(normalize_answer, answers))


_ANSWER_CUE = re.compile(r"answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)
_LEADING_LETTER = (
    re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]"),  # (B) [b]
    re.compile(r"([A-Z])(?:[).:,\]]|\s|$)"),  # B  B)  B.  B is right
    re.compile(r"([a-z])(?:[).:\]]|\s*$)"),  # b)  b.  b
)


def _leading_letter(text: str) -> str | None:
    for pattern in _LEADING_LETTER:
        match = pattern.match(text)
        if match:
            return match.group(1)
    return None


def extract_letter(text: str, n_choices: int) -> int | None:
    """Index of the option letter a letter-format MCQ response chose, or ``None``.

    Accepts ``"B"``, ``"B)"``, ``"(B)"``, ``" b."``, ``"Answer: B"``, ``"The answer is (b)"``. A lowercase
    letter counts only when followed by punctuation or nothing (``"a dog"`` is not ``A``).
    Letters beyond ``n_choices`` give ``None``.
    """
    stripped = text.strip()
    letter = _leading_letter(stripped)
    if letter is None:
        cue = _ANSWER_CUE.search(stripped)
        letter = _leading_letter(stripped[cue.end():]) if cue else None
    if letter is None:
        return None
    index = ord(letter.upper()) - ord("A")
    return index if index < n_choices else None


def _starts_with_normalized(text: str, prefix: str) -> bool:
    norm, norm_prefix = normalize_answer(text), normalize_answer(prefix)
    return bool(norm_prefix) and (norm == norm_prefix or norm.startswith(norm_prefix + " "))


def is_refusal(text: str, refusal_text: str = DEFAULT_REFUSAL) -> bool:
    """Whether ``text`` is the refusal sentence (normalized; trailing text after it is allowed)."""
    return _starts_with_normalized(text, refusal_text)


def is_correction(text: str, prefix: str = CORRECTION_PREFIX) -> bool:
    """Whether ``text`` starts with the self-correction prefix ("Wait, the correct answer is ...")."""
    return extract_correction(text, prefix) is not None


def extract_correction(text: str, prefix: str = CORRECTION_PREFIX) -> str | None:
    """The answer a correction gives (up to the first newline, without a final period), else ``None``."""
    words = [re.escape(w) for w in re.findall(r"[\w']+", prefix)]
    match = re.match(r"\s*" + r"[\s,;:]+".join(words) + r"[\s:]+(.+)", text, re.IGNORECASE | re.DOTALL)
    if match is None:
        return None
    answer = match.group(1).split("\n", 1)[0].strip().rstrip(".").strip()
    return answer or None


class Judge(Protocol):
    """Decides whether a prediction answers a question correctly."""

    def __call__(self, question: str, prediction: str, answers: list[str]) -> bool: ...


class ExactMatchJudge:
    """Default judge: normalized exact match against any gold alias."""

    def __call__(self, question: str, prediction: str, answers: list[str]) -> bool:
        return exact_match(prediction, answers)


class ContainmentJudge:
    """More lenient judge: a normalized gold alias appears (on word boundaries) inside the prediction.

    It accepts verbose answers ("It was Paris, in 1900") but also hedges listing several candidates.
    """

    def __call__(self, question: str, prediction: str, answers: list[str]) -> bool:
        return contains_answer(prediction, answers)


JUDGE_QUESTION = (
    "Question: {question}\nReference answers: {answers}\nCandidate answer: {prediction}\n"
    "Does the candidate answer mean the same as one of the reference answers? Answer yes or no."
)


class LocalModelJudge:
    """Asks a local chat model whether a prediction means the same as a reference answer (the seeds used a cloud
    LLM judge). Exact matches are accepted without asking and empty predictions rejected; otherwise the judge is
    ``P(yes) / (P(yes) + P(no)) >= threshold`` for the model's next token after :data:`JUDGE_QUESTION` in its chat
    template ("yes"/"Yes"/"no"/"No" variants summed). ``model`` and ``tokenizer`` are a loaded causal LM."""

    def __init__(self, model, tokenizer, threshold: float = 0.5, max_answers: int = 10) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("LocalModelJudge needs a chat model (its tokenizer has no chat template).")
        self.tokenizer, self.threshold, self.max_answers = tokenizer, threshold, max_answers
        self.yes_ids = self._first_tokens(("yes", "Yes", " yes", " Yes"))
        self.no_ids = self._first_tokens(("no", "No", " no", " No"))
        unknown = {tokenizer.unk_token_id} - {None}
        if set(self.yes_ids) & set(self.no_ids) or unknown & set(self.yes_ids + self.no_ids):
            raise ValueError("LocalModelJudge: the judge's tokenizer cannot tell 'yes' from 'no'.")
        self.model = model.eval()

    def _first_tokens(self, words: Sequence[str]) -> list[int]:
        return sorted({self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})

    def probability(self, question: str, prediction: str, answers: Sequence[str]) -> float:
        """P(yes) / (P(yes) + P(no)) of the judge model."""
        import torch

        text = JUDGE_QUESTION.format(question=question.strip(), prediction=prediction.strip(),
                                     answers="; ".join(a.strip() for a in list(answers)[: self.max_answers]))
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        with torch.no_grad():
            logits = self.model(**ids.to(self.model.device)).logits[0, -1].float()
        probs = logits.softmax(-1)
        yes, no = probs[self.yes_ids].sum(), probs[self.no_ids].sum()
        return float(yes / (yes + no))

    def __call__(self, question: str, prediction: str, answers: list[str]) -> bool:
        if exact_match(prediction, answers):
            return True
        if not normalize_answer(prediction) or not answers:
            return False
        return self.probability(question, prediction, answers) >= self.threshold

