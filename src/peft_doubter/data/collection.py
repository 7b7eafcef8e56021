"""Oracle collection into an activation cache.

For every question the frozen base answers once (pass 1 with adapters off): greedy open answers, or the best option
of a multiple-choice question (cloze log-likelihood or letter). Its correctness is the oracle the Doubter learns
from. The cache (a `datasets` dataset on disk, written in resumable shards) keeps each question's pooled read-layer
states (what pass 1 of the Doubter computes, through the same code), the answer, its correctness and the answer's
confidence features for the baselines; with `read_position='answer'` also the answer's tokens with their states and
signals (for multiple choice: the chosen option's tokens, read teacher-forced).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..names import CACHE_MANIFEST, TOKEN_SIGNALS
from ..paths import read_json, write_json
from ..tuner import backbone
from ..tuner.capture import Reading, position_ids_from_mask
from ..tuner.generation import Draft
from .prompts import (
    LETTERS,
    PromptConfig,
    build_prompt,
    cloze_option_ids,
    first_line,
    prompt_pass_of,
    score_cloze_batch,
)
from .scoring import ContainmentJudge, ExactMatchJudge, Judge, LocalModelJudge
from .shards import build_shards, finished_rows, load_shards


JUDGES: dict[str, type] = {"exact_match": ExactMatchJudge, "containment": ContainmentJudge}
MODEL_JUDGE_PREFIX = "model:"


def check_judge(spec: str) -> None:
    if spec not in JUDGES and not (spec.startswith(MODEL_JUDGE_PREFIX) and spec[len(MODEL_JUDGE_PREFIX):].strip()):
        raise ValueError(f"`judge` must be one of {sorted(JUDGES)} or '{MODEL_JUDGE_PREFIX}<chat model name or "
                         f"path>', got {spec!r}.")


def make_judge(spec: str) -> Judge:
    """The open-QA judge named by `spec`: `exact_match`, `containment`, or `model:<name or path>` — a
    `LocalModelJudge` on that chat model (an embedded name such as smollm2-135m-instruct, or a checkpoint)."""
    check_judge(spec)
    if spec in JUDGES:
        return JUDGES[spec]()
    from ..tuner.base_models import load_base_model

    return LocalModelJudge(*load_base_model(spec[len(MODEL_JUDGE_PREFIX):].strip()))


@dataclass
class CollectConfig:
    """What to collect: the base model, the questions and how the base answers them."""

    model: str = field(
        default="gemma-3-270m",
        metadata={"help": "Base model: an embedded name (gemma-3-270m, smollm2-135m-instruct), a GGUF file or a "
                  "transformers checkpoint."},
    )
    dataset: str = field(
        default="triviaqa",
        metadata={"help": "A benchmark (triviaqa, nq_open, mmlu, arc_easy, arc_challenge, sciq, sciq_open, "
                  "commonsense_qa, openbookqa) or a JSONL/JSON/CSV file with question, answer(s) and optional "
                  "choices; several, comma-separated (e.g. triviaqa,nq_open), are sampled and split as one "
                  "(all open-ended or all multiple-choice; run.json's `data_sources` counts each)."},
    )
    dataset_split: Optional[str] = field(default=None, metadata={"help": "Split of the benchmark (default: its own)."})
    question_column: str = field(default="question", metadata={"help": "User data: question column."})
    answer_column: str = field(default="answer", metadata={"help": "User data: answer (or list of aliases) column."})
    choices_column: Optional[str] = field(default=None, metadata={"help": "User data: options column (MCQ)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "User data: correct option column (MCQ)."})
    limit: Optional[int] = field(default=1000, metadata={"help": "Questions to sample (seeded); None: all."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the question sample, the exemplars and the splits."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of questions for validation."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of questions held out for the test."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest greedy open answer (cut at a newline)."})
    batch_size: int = field(default=64, metadata={"help": "Questions per batch (decoded together; finished rows leave)."})
    shard_size: int = field(default=256, metadata={"help": "Questions per cache shard (the unit of resumption)."})
    judge: str = field(
        default="exact_match",
        metadata={"help": "Open-QA correctness: exact_match, containment, or model:<chat model> (a local LLM judge, "
                  "e.g. model:smollm2-135m-instruct; exact matches are accepted without asking)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Base model dtype: float32, bfloat16 or float16."})
    quantization: Optional[str] = field(default=None, metadata={"help": "Quantize the base: nf4 or int8."})

    def __post_init__(self) -> None:
        check_judge(self.judge)
        if self.val_fraction <= 0 or self.test_fraction <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("`val_fraction` and `test_fraction` must be positive and sum to less than 1.")
        for name in ("max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"`limit` must be >= 1 or None, got {self.limit}.")
        if self.quantization not in (None, "nf4", "int8"):
            raise ValueError(f"`quantization` must be nf4, int8 or None, got {self.quantization!r}.")


@dataclass
class Pass1Answer:
    """The base model's own answer to one question and what it revealed about its confidence."""

    text: str
    correct: bool
    choice: int = -1
    token_logprobs: list[float] = field(default_factory=list)
    first_top2: list[float] = field(default_factory=list)
    first_entropy: float = float("nan")
    option_logprobs: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the kept tokens of an open answer


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-sequence plus every token whose text contains a newline: open answers end at the first newline."""
    cached = getattr(tokenizer, "_doubter_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = sorted({tokenizer.eos_token_id, *(i for i, text in enumerate(texts) if "\n" in text)} - {None})
        tokenizer._doubter_stop_ids = cached
    return cached


def answer_open(doubter, tokenizer, inputs: dict, answers: list[list[str]], questions: list[str], judge: Judge,
                max_new_tokens: int) -> tuple[list[Pass1Answer], Draft]:
    """Greedy answers cut at the first newline (`DoubterModel.draft`: the read layers are recorded on the way),
    with per-token log-probabilities of the kept tokens and the first token's top-2 and entropy."""
    draft = doubter.draft(inputs["input_ids"], inputs["attention_mask"], max_new_tokens,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
    results = []
    for row, kept in enumerate(draft.tokens):
        text = first_line(tokenizer.decode(kept, skip_special_tokens=True))
        signals = draft.step_signals[row]  # (max(L, 1), S): TOKEN_SIGNALS columns
        logprobs = signals[: len(kept), TOKEN_SIGNALS.index("logprob")].tolist()
        first = signals[0]
        results.append(Pass1Answer(
            text, bool(text) and judge(questions[row], text, answers[row]),
            token_logprobs=logprobs or [float(first[TOKEN_SIGNALS.index("top1")])],
            first_top2=[float(first[TOKEN_SIGNALS.index("top1")]), float(first[TOKEN_SIGNALS.index("top2")])],
            first_entropy=float(first[TOKEN_SIGNALS.index("entropy")]), token_ids=kept))
    return results, draft


def answer_cloze(model, tokenizer, inputs: dict, prompts: list[str], choices: list[list[str]], labels: list[int],
                 prompt_pass: Any = None) -> list[Pass1Answer]:
    """Each question's option with the highest length-normalised log-likelihood (`score_cloze_batch`, continuing
    `prompt_pass` or, without one, with the prompts' pass as its first forward)."""
    results = []
    scores_of = score_cloze_batch(model, tokenizer, inputs, prompts, choices, prompt_pass=prompt_pass)
    for options, label, scores in zip(choices, labels, scores_of):
        choice = int(np.argmax(scores))
        results.append(Pass1Answer(options[choice], choice == label, choice=choice, option_logprobs=scores))
    return results


def _first_token_stats(logits: torch.Tensor) -> tuple[list[float], float]:
    logprobs = logits.float().log_softmax(-1)
    top2 = logprobs.topk(2).values.tolist()
    entropy = float(-(logprobs.exp() * logprobs).sum())
    return top2, entropy


def letter_token_id(tokenizer, index: int) -> int:
    """The token of option `index`'s letter as the answer after `Answer:`."""
    return tokenizer(f" {LETTERS[index]}", add_special_tokens=False)["input_ids"][-1]


def answer_letter(model, tokenizer, inputs: dict, choices: list[list[str]], labels: list[int]
                  ) -> list[Pass1Answer]:
    """The most probable option letter at the answer position, among the question's letters."""
    with torch.no_grad():
        positions = position_ids_from_mask(inputs["attention_mask"])
        logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
    results = []
    for row, options in enumerate(choices):
        letter_ids = [letter_token_id(tokenizer, i) for i in range(len(options))]
        option_logits = logits[row, letter_ids].float()
        choice = int(option_logits.argmax())
        top2, entropy = _first_token_stats(logits[row])
        results.append(Pass1Answer(LETTERS[choice], choice == labels[row], choice=choice,
                                   option_logprobs=option_logits.log_softmax(-1).tolist(),
                                   first_top2=top2, first_entropy=entropy))
    return results


def cache_features(read_layers: int, feature_dim: int, hidden_size: int) -> datasets.Features:
    return datasets.Features({
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "choices": datasets.Sequence(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "split": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "prompt_truncated": datasets.Value("bool"),
        "pass1_answer": datasets.Value("string"),
        "pass1_choice": datasets.Value("int64"),
        "correct": datasets.Value("bool"),
        "token_logprobs": datasets.Sequence(datasets.Value("float32")),
        "first_top2": datasets.Sequence(datasets.Value("float32")),
        "first_entropy": datasets.Value("float32"),
        "option_logprobs": datasets.Sequence(datasets.Value("float32")),
        "features": datasets.Array2D((read_layers, feature_dim), "float32"),  # at the read position
        "prompt_features": datasets.Array2D((read_layers, feature_dim), "float32"),  # at the prompt's last token
        # Open QA: the answer's tokens, their read-layer states (each divided by its RMS) and TOKEN_SIGNALS.
        "answer_ids": datasets.Sequence(datasets.Value("int64")),
        "answer_states": datasets.Array3D((None, read_layers, hidden_size), "float16"),
        "token_signals": datasets.Array2D((None, len(TOKEN_SIGNALS)), "float32"),
    })


def cache_identity(model, read_layers: Sequence[int], pooling: str, prompt_config: PromptConfig,
                   collect_config: CollectConfig, exemplar_ids: Sequence[str], read_position: str = "prompt"
                   ) -> dict[str, Any]:
    """What a cache depends on; a cache with a different identity is refused."""
    return {
        "base_fingerprint": backbone.fingerprint(model),
        "read_layers": list(read_layers),
        "pooling": pooling,
        "read_position": read_position,
        "prompt": asdict(prompt_config),
        "dataset": collect_config.dataset,
        "dataset_split": collect_config.dataset_split,
        "max_new_tokens": collect_config.max_new_tokens,
        "judge": collect_config.judge,
        "exemplar_ids": list(exemplar_ids),
        # the question sample and its shards: another limit, seed, split or shard size would mix two collections
        "sample": {key: getattr(collect_config, key) for key in ("limit", "sample_seed", "val_fraction",
                                                                  "test_fraction", "shard_size", "question_column",
                                                                  "answer_column", "choices_column", "label_column")},
    }


def check_cache_identity(cache_dir: Path, identity: dict[str, Any]) -> None:
    """Raise if the cache in `cache_dir` was built for another base, other layers or another prompt setup."""
    manifest_path = cache_dir / CACHE_MANIFEST
    if not manifest_path.exists():
        return
    stored = {"read_position": "prompt", **read_json(manifest_path)["identity"]}  # older caches lack read_position
    stored.setdefault("sample", identity["sample"])  # caches made before the sample was recorded
    differences = [key for key in identity if key != "base_fingerprint" and stored.get(key) != identity[key]]
    problems = backbone.fingerprint_mismatch(stored["base_fingerprint"], identity["base_fingerprint"])
    if problems:
        differences.append("base model (" + "; ".join(problems) + ")")
    if differences:
        raise ValueError(
            f"The activation cache in {cache_dir} was built with a different " + ", ".join(differences)
            + ". Use a new --run-dir, or delete the cache to rebuild it."
        )


def collect(
    peft_model,
    tokenizer,
    questions: datasets.Dataset,
    cache_dir: Path,
    identity: dict[str, Any],
    prompt_config: PromptConfig,
    exemplars: Sequence[dict],
    collect_config: CollectConfig,
) -> datasets.Dataset:
    """Answer every question with the frozen base (pass 1, adapters off) and cache the result. Finished shards
    are kept, so an interrupted collection resumes where it stopped; `questions` needs a `split` column."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_cache_identity(cache_dir, identity)
    write_json(cache_dir / CACHE_MANIFEST, {"identity": identity})
    doubter = peft_model.base_model
    config = peft_model.peft_config[peft_model.active_adapter]
    read_layers = doubter._plans[peft_model.active_adapter].read
    hidden = backbone.hidden_size(peft_model)
    features = cache_features(len(read_layers), hidden * (2 if config.pooling == "last_mean" else 1), hidden)
    judge = make_judge(collect_config.judge)
    tokenizer.padding_side = "left"
    truncated = 0
    progress = tqdm(total=len(questions), desc="Collecting pass-1 answers", unit="q",
                    initial=min(len(questions), finished_rows(cache_dir, collect_config.shard_size)))

    def produce(start: int, end: int) -> list[dict]:
        nonlocal truncated
        shard = questions.select(range(start, end))
        rows: list[dict] = [{}] * len(shard)
        order = sorted(range(len(shard)), key=lambda i: len(shard[i]["question"]))  # similar lengths together
        for first in range(0, len(order), collect_config.batch_size):
            indices = order[first:first + collect_config.batch_size]
            batch_rows = collect_batch(peft_model, tokenizer, [shard[i] for i in indices], prompt_config, exemplars,
                                       judge, collect_config)
            for index, row in zip(indices, batch_rows):
                rows[index] = row
            progress.update(len(indices))
        truncated += sum(row["prompt_truncated"] for row in rows)
        return rows

    build_shards(cache_dir, len(questions), collect_config.shard_size, produce, features)
    progress.close()
    if truncated:
        warnings.warn(f"{truncated} prompts were truncated from the left to fit `max_prompt_tokens`.")
    return load_cache(cache_dir)


def collect_batch(peft_model, tokenizer, batch: list[dict], prompt_config: PromptConfig, exemplars: Sequence[dict],
                  judge: Judge, collect_config: CollectConfig) -> list[dict]:
    """Cache rows of a batch of questions: the prompt, the base's own answer (adapters off) and its confidence
    features, and the pooled read-layer features of the same forward (pass 1)."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        prompts = [build_prompt(example, tokenizer, prompt_config, exemplars) for example in batch]
    texts = [p.text for p in prompts]
    chat = prompt_config.style == "chat"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(peft_model.device)
    doubter = peft_model.base_model
    doubter._check_prompt(inputs["input_ids"], inputs["attention_mask"])
    config = peft_model.peft_config[peft_model.active_adapter]
    hidden = backbone.hidden_size(peft_model)
    read_layers = len(doubter._plans[peft_model.active_adapter].read)
    empty_states = np.zeros((0, read_layers, hidden), dtype=np.float16)
    empty_signals = np.zeros((0, len(TOKEN_SIGNALS)), dtype=np.float32)
    answer_parts: list[tuple[list[int], np.ndarray, np.ndarray]] = [([], empty_states, empty_signals)] * len(batch)
    with peft_model.disable_adapter():
        base = doubter.model
        if not batch[0]["choices"]:
            answers, draft = answer_open(doubter, tokenizer, inputs, [e["answers"] for e in batch],
                                         [e["question"] for e in batch], judge, collect_config.max_new_tokens)
            prompt_features, features = draft.prompt_features, draft.prompt_features
            if config.read_position == "answer":
                features = draft.reading.features
                if config.pooling != "last":
                    features = doubter.read_answers(inputs["input_ids"], inputs["attention_mask"],
                                                    draft.tokens).stacked()
            answer_parts = _answer_parts(draft.reading, draft.tokens)
        else:
            prompt_pass = None
            with doubter.capturing_prompt(inputs["attention_mask"]) as capture, torch.no_grad():
                if prompt_config.mc_format == "cloze":
                    prompt_pass = prompt_pass_of(base, inputs)  # pass 1; the options and the chosen one continue it
                    answers = answer_cloze(base, tokenizer, inputs, texts, [e["choices"] for e in batch],
                                           [e["label"] for e in batch], prompt_pass)
                else:
                    answers = answer_letter(base, tokenizer, inputs, [e["choices"] for e in batch],
                                            [e["label"] for e in batch])
            prompt_features = features = capture.stacked()
            if config.read_position == "answer":  # the chosen option's tokens, teacher-forced
                chosen = [chosen_option_ids(tokenizer, text, e["choices"], answer.choice, prompt_config.mc_format)
                          for text, e, answer in zip(texts, batch, answers)]
                reading = doubter.read_given_answers(inputs["input_ids"], inputs["attention_mask"], chosen,
                                                     prompt_pass)
                features = reading.features
                if config.pooling != "last":
                    features = doubter.read_answers(inputs["input_ids"], inputs["attention_mask"], chosen).stacked()
                answer_parts = _answer_parts(reading, chosen)
    return [
        {
            "id": example["id"], "question": example["question"], "answers": example["answers"],
            "choices": example["choices"], "label": example["label"], "split": example["split"],
            "prompt": prompt.text, "prompt_truncated": prompt.truncated, "pass1_answer": answer.text,
            "pass1_choice": answer.choice, "correct": answer.correct, "token_logprobs": answer.token_logprobs,
            "first_top2": answer.first_top2, "first_entropy": answer.first_entropy,
            "option_logprobs": answer.option_logprobs, "features": features[row].cpu().numpy(),
            "prompt_features": prompt_features[row].cpu().numpy(), "answer_ids": parts[0],
            "answer_states": parts[1], "token_signals": parts[2],
        }
        for row, (example, prompt, answer, parts) in enumerate(zip(batch, prompts, answers, answer_parts))
    ]


def chosen_option_ids(tokenizer, prompt: str, choices: list[str], choice: int, mc_format: str) -> list[int]:
    """The tokens of the base's chosen option as its answer after `prompt`: the cloze continuation, or the letter."""
    if mc_format == "cloze":
        return cloze_option_ids(tokenizer, prompt, [choices[choice]])[0]
    return [letter_token_id(tokenizer, choice)]


def _answer_parts(reading: Reading, answer_ids: Sequence[Sequence[int]]) -> list[tuple[list[int], np.ndarray,
                                                                                      np.ndarray]]:
    """Each row's answer tokens with their cached states (float16) and signals."""
    return [(list(ids), reading.answer_states[row, :len(ids)].cpu().numpy().astype(np.float16),
             reading.token_signals[row, :len(ids)].cpu().numpy()) for row, ids in enumerate(answer_ids)]


def load_cache(cache_dir: Path) -> datasets.Dataset:
    """All finished shards of a cache, in order."""
    return load_shards(cache_dir, f"No activation cache in {cache_dir}: run `peft-doubter collect` first.")


def cache_is_multiple_choice(cache_dir: Path) -> bool:
    """Whether a cache holds multiple-choice questions (a collection never mixes them with open ones)."""
    cache = load_cache(cache_dir)
    return len(cache) > 0 and len(cache[0]["choices"]) > 0
