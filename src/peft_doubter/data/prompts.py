"""Prompt formats for unified QA rows (see :mod:`peft_doubter.data.benchmarks`).

- ``completion`` style (base models): few-shot ``Q: ...\\nA:`` for open QA, exemplars separated by a blank
  line; greedy answers are cut at the first newline (:func:`first_line`).
- ``chat`` style (instruct models): exemplars become user/assistant turns, rendered only through
  ``tokenizer.apply_chat_template`` (with ``enable_thinking=False``, which templates without it ignore).
- Multiple choice as ``letter`` (``Question: ...\\nA. ...\\nB. ...\\nAnswer:``, the answer is a letter) or as
  ``cloze`` (the prompt ends at ``Answer:``; each option is scored by the log-likelihood of
  ``" option text"`` as a continuation: :func:`cloze_pairs`, :func:`score_cloze_options`).

Exemplars come from a separate pool passed explicitly; an exemplar with the question's own id (or the same
normalized question) is refused.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..tuner.capture import position_ids_from_mask
from .scoring import normalize_answer


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAT_OPEN_INSTRUCTION = "Answer the question with a short answer only, no explanation."
CHAT_LETTER_INSTRUCTION = "Answer with the letter of the correct option only."
CHAT_CLOZE_INSTRUCTION = "Answer with the text of the correct option only."
EVIDENCE_LABEL = "Evidence:"  # precedes looked-up passages in an open-book prompt

Example = Mapping[str, Any]


@dataclass
class PromptConfig:
    """How questions are turned into prompts."""

    style: Literal["completion", "chat"] = field(
        default="completion",
        metadata={"help": "'completion': few-shot Q:/A: text for base models; 'chat': the tokenizer's chat template."},
    )
    k_shot: int = field(
        default=5, metadata={"help": "Number of exemplars taken (in order) from the exemplar pool."}
    )
    mc_format: Literal["letter", "cloze"] = field(
        default="letter",
        metadata={"help": "Multiple choice as lettered options answered by a letter, or as cloze option scoring."},
    )
    max_prompt_tokens: int | None = field(
        default=1024,
        metadata={
            "help": "Longer prompts lose leading exemplars, then the start of the question (None: no limit)."
        },
    )

    def __post_init__(self) -> None:
        if self.style not in ("completion", "chat"):
            raise ValueError(f"style must be 'completion' or 'chat', got {self.style!r}")
        if self.mc_format not in ("letter", "cloze"):
            raise ValueError(f"mc_format must be 'letter' or 'cloze', got {self.mc_format!r}")
        if self.k_shot < 0:
            raise ValueError(f"k_shot must be >= 0, got {self.k_shot}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens must be positive or None, got {self.max_prompt_tokens}")


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt; ``truncated`` is True when exemplars or question text were cut to fit."""

    text: str
    truncated: bool
    n_exemplars: int


def format_choices(choices: Sequence[str]) -> str:
    """``"A. first\\nB. second"``."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"At most {len(LETTERS)} choices can be lettered, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _is_mc(example: Example) -> bool:
    return bool(example.get("choices"))


def _question_text(example: Example, mc_format: str) -> str:
    """The question as shown to the model, without the answer cue."""
    if _is_mc(example) and mc_format == "letter":
        return f"{example['question']}\n{format_choices(example['choices'])}"
    return str(example["question"])


def _evidence(example: Example) -> str:
    """`Evidence: ...` followed by a newline when the example carries looked-up evidence (the agent's open-book
    prompts), else nothing."""
    evidence = str(example.get("evidence") or "").strip()
    return f"{EVIDENCE_LABEL} {evidence}\n" if evidence else ""


def _gold(example: Example, mc_format: str) -> str:
    if _is_mc(example):
        label = example["label"]
        return LETTERS[label] if mc_format == "letter" else example["choices"][label]
    return example["answers"][0]


def gold_answer(row: dict[str, Any], mc_format: str) -> str:
    """The correct answer as the model should say it: for open QA the model's own wording when it was judged right
    (it matches a gold alias), otherwise the first gold answer; for multiple choice the option (or its letter)."""
    if not row["choices"] and row["correct"]:
        return row["pass1_answer"]
    return _gold(row, mc_format)


def _completion_block(question_text: str, mc: bool) -> str:
    return f"Question: {question_text}\nAnswer:" if mc else f"Q: {question_text}\nA:"


def _chat_instruction(example: Example, mc_format: str) -> str:
    if not _is_mc(example):
        return CHAT_OPEN_INSTRUCTION
    return CHAT_LETTER_INSTRUCTION if mc_format == "letter" else CHAT_CLOZE_INSTRUCTION


def check_exemplars(example: Example, exemplars: Sequence[Example]) -> None:
    """Refuse exemplars that are the question itself (same id or same normalized question)."""
    norm = normalize_answer(example["question"])
    for ex in exemplars:
        if ex["id"] == example["id"] or normalize_answer(ex["question"]) == norm:
            raise ValueError(
                f"Exemplar {ex['id']!r} leaks question {example['id']!r} into its own prompt; "
                "draw exemplars from a pool disjoint from the evaluated questions"
            )


def _render(
    example: Example,
    body: str,
    exemplars: Sequence[Example],
    config: PromptConfig,
    tokenizer: Any,
) -> str:
    """Full prompt for the question block ``body`` after ``exemplars``."""
    mc = _is_mc(example)
    if config.style == "completion":
        shots = [
            f"{_evidence(ex)}{_completion_block(_question_text(ex, config.mc_format), mc)} {_gold(ex, config.mc_format)}"
            for ex in exemplars
        ]
        return "\n\n".join([*shots, body])
    messages: list[dict[str, str]] = []
    for ex in exemplars:
        messages.append({"role": "user", "content": _evidence(ex) + _question_text(ex, config.mc_format)})
        messages.append({"role": "assistant", "content": _gold(ex, config.mc_format)})
    messages.append({"role": "user", "content": body})
    instruction = _chat_instruction(example, config.mc_format)
    messages[0] = {"role": "user", "content": f"{instruction}\n\n{messages[0]['content']}"}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def count_tokens(tokenizer: Any, text: str, chat: bool) -> int:
    """Tokens the model sees: chat renderings already hold their special tokens, completions get them added."""
    return len(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def keep_last_tokens(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The end of ``text`` covering its last ``n_tokens`` tokens (exact characters with a fast tokenizer)."""
    if n_tokens <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= n_tokens else text[offsets[-n_tokens][0]:]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[-n_tokens:])


def build_prompt(
    example: Example,
    tokenizer: Any,
    config: PromptConfig | None = None,
    exemplars: Sequence[Example] = (),
) -> Prompt:
    """Render ``example`` with the first ``config.k_shot`` of ``exemplars``.

    For cloze multiple choice this is the shared prompt; pair it with options through :func:`cloze_pairs`.
    Over ``max_prompt_tokens``, leading exemplars are dropped first, then the question block is cut from
    the left (its end and the answer cue stay); this warns and sets ``Prompt.truncated``.
    """
    config = config or PromptConfig()
    shots = list(exemplars)[: config.k_shot]
    check_exemplars(example, shots)
    question_text = _question_text(example, config.mc_format)
    chat = config.style == "chat"
    body = _evidence(example) + (question_text if chat else _completion_block(question_text, _is_mc(example)))
    text = _render(example, body, shots, config, tokenizer)
    limit = config.max_prompt_tokens
    if limit is None or count_tokens(tokenizer, text, chat) <= limit:
        return Prompt(text, False, len(shots))
    while shots:
        shots.pop(0)
        text = _render(example, body, shots, config, tokenizer)
        if count_tokens(tokenizer, text, chat) <= limit:
            break
    else:
        budget = limit - count_tokens(tokenizer, _render(example, "", [], config, tokenizer), chat)
        while budget > 0:
            text = _render(example, keep_last_tokens(tokenizer, body, budget), [], config, tokenizer)
            excess = count_tokens(tokenizer, text, chat) - limit
            if excess <= 0:
                break
            budget -= excess
        else:
            raise ValueError(f"max_prompt_tokens={limit} leaves no room for the question of {example['id']!r}")
    warnings.warn(f"Prompt for {example['id']!r} truncated to {limit} tokens ({len(shots)} exemplars kept)")
    return Prompt(text, True, len(shots))


def first_line(completion: str) -> str:
    """A greedy open-QA completion cut at its first newline, stripped."""
    return completion.split("\n", 1)[0].strip()


def cloze_continuation(prompt: str, option: str) -> str:
    """``" option"``; no space is added when the prompt ends in whitespace (chat) or the option starts with it."""
    return option if prompt[-1:].isspace() or option[:1].isspace() else f" {option}"


def cloze_pairs(prompt: str, options: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, continuation) for every option of a cloze multiple-choice question."""
    return [(prompt, cloze_continuation(prompt, o)) for o in options]


def cloze_option_ids(tokenizer: Any, prompt: str, options: Sequence[str]) -> list[list[int]]:
    """The tokens each option's continuation (:func:`cloze_continuation`) adds after the prompt's own tokens."""
    plain_context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont_ids: list[list[int]] = []
    for cont in (cloze_continuation(prompt, o) for o in options):
        whole = tokenizer(prompt + cont, add_special_tokens=False)["input_ids"]
        ids = whole[len(plain_context):] if whole[: len(plain_context)] == plain_context else []
        ids = ids or tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"Option {cont!r} encodes to no tokens")
        cont_ids.append(ids)
    return cont_ids


@torch.inference_mode()
def score_cloze_options(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    options: Sequence[str],
    normalize: Literal["token", "char"] | None = "token",
    add_special_tokens: bool = True,
) -> list[float]:
    """Log-likelihood of each option (as :func:`cloze_continuation`) after ``prompt``, in one batched forward.

    ``normalize``: ``"token"`` divides the summed log-probability by the continuation's token count,
    ``"char"`` by its character count, ``None`` keeps the sum. The prompt is encoded on its own (with
    special tokens unless ``add_special_tokens=False``, e.g. for chat renderings); each continuation's
    tokens are those that ``prompt + continuation`` adds after the prompt's tokens. The prompt runs once and the
    options on its KV cache (:func:`score_cloze_batch` with one question); dropout is off during the call.
    """
    if not options:
        return []
    context = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if not context:
        raise ValueError("The cloze prompt encodes to no tokens; pass add_special_tokens=True or a longer prompt")
    device = getattr(model, "device", None) or next(model.parameters()).device
    inputs = {"input_ids": torch.tensor([context], device=device),
              "attention_mask": torch.ones((1, len(context)), dtype=torch.long, device=device)}
    return score_cloze_batch(model, tokenizer, inputs, [prompt], [options], normalize=normalize)[0]


def prompt_pass_of(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> Any:
    """The forward over left-padded prompts that cloze scoring continues: its KV cache and last position's logits."""
    mask = inputs["attention_mask"]
    return model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def score_cloze_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Mapping[str, torch.Tensor],
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    normalize: Literal["token", "char"] | None = "token",
    chunk_size: int = 32,
    prompt_pass: Any = None,
) -> list[list[float]]:
    """:func:`score_cloze_options` for a batch of questions at once: `inputs` are the `prompts` tokenized and
    left-padded as :func:`score_cloze_options` tokenizes one. One forward over the prompts (`prompt_pass_of`, or
    the given `prompt_pass`; a hook on the model sees it as the batch's prompt pass), then every option's
    continuation on a copy of their KV cache, `chunk_size` continuations per forward; the prompts are not
    recomputed per option."""
    if normalize not in ("token", "char", None):
        raise ValueError(f"normalize must be 'token', 'char' or None, got {normalize!r}")
    mask = inputs["attention_mask"]
    was_training = model.training
    model.eval()
    try:
        prompt_pass = prompt_pass if prompt_pass is not None else prompt_pass_of(model, inputs)
        first = prompt_pass.logits[:, -1].float().log_softmax(-1)  # (B, V): every option's first token
        pairs = [(row, ids) for row, (prompt, row_options) in enumerate(zip(prompts, options))
                 for ids in cloze_option_ids(tokenizer, prompt, row_options)]
        lengths = mask.sum(-1)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        totals = []
        for start in range(0, len(pairs), chunk_size):
            chunk = pairs[start:start + chunk_size]
            rows = torch.tensor([row for row, _ in chunk], device=mask.device)
            width = max(len(ids) for _, ids in chunk)
            tokens = torch.tensor([ids + [pad] * (width - len(ids)) for _, ids in chunk], device=mask.device)
            kept = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids in chunk], device=mask.device)
            token_lp = first[rows].gather(-1, tokens[:, :1])
            if width > 1:
                cache = copy.deepcopy(prompt_pass.past_key_values)
                cache.reorder_cache(rows)
                logits = model(input_ids=tokens[:, :-1], attention_mask=torch.cat([mask[rows], kept[:, :-1]], 1),
                               position_ids=lengths[rows, None] + torch.arange(width - 1, device=mask.device),
                               past_key_values=cache, use_cache=True).logits.float()
                later = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
                token_lp = torch.cat([token_lp, later], dim=1)
            totals.append((token_lp * kept).sum(-1))
    finally:
        model.train(was_training)
    sums = torch.cat(totals)
    if normalize == "token":
        sums = sums / torch.tensor([len(ids) for _, ids in pairs], device=sums.device)
    elif normalize == "char":
        sums = sums / torch.tensor([len(cloze_continuation(prompts[row], o)) for row, row_options in enumerate(options)
                                    for o in row_options], device=sums.device)
    scores, start = [], 0
    for row_options in options:
        scores.append(sums[start:start + len(row_options)].tolist())
        start += len(row_options)
    return scores
