"""Oracle collection into an activation cache.

For every question the frozen base answers once (pass 1 with adapters off): greedy open answers, or the best option
of a multiple-choice question (cloze log-likelihood or letter). Its correctness is the oracle the Doubter learns
from. The cache (a `datasets` dataset on disk, written in resumable shards) keeps each question's pooled read-layer
states (what pass 1 of the Doubter computes, through the same code), the answer, its correctness and the answer's
confidence features for the baselines.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..names import CACHE_MANIFEST
from ..tuner import backbone
from ..tuner.capture import position_ids_from_mask
from .prompts import LETTERS, PromptConfig, build_prompt, first_line, score_cloze_options
from .scoring import ContainmentJudge, ExactMatchJudge, Judge, LocalModelJudge


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
                  "choices."},
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
    batch_size: int = field(default=16, metadata={"help": "Questions per batch."})
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


def _first_token_stats(logits: torch.Tensor) -> tuple[list[float], float]:
    logprobs = logits.float().log_softmax(-1)
    top2 = logprobs.topk(2).values.tolist()
    entropy = float(-(logprobs.exp() * logprobs).sum())
    return top2, entropy


def answer_open(model, tokenizer, inputs: dict, answers: list[list[str]], questions: list[str],
                judge: Judge, max_new_tokens: int) -> list[Pass1Answer]:
    """Greedy answers cut at the first newline, with per-token log-probabilities of the kept tokens."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(tokenizer))
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1)  # (B, steps, V)
    results = []
    for row, tokens in enumerate(generated):
        stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
        kept: list[int] = []
        for token in tokens.tolist():
            if token in stops:
                break
            kept.append(token)
        text = first_line(tokenizer.decode(kept, skip_special_tokens=True))
        logprobs = logits[row, : max(len(kept), 1)].float().log_softmax(-1)
        token_logprobs = [float(logprobs[i, t]) for i, t in enumerate(kept)] or [float(logprobs[0].max())]
        top2, entropy = _first_token_stats(logits[row, 0])
        results.append(Pass1Answer(text, bool(text) and judge(questions[row], text, answers[row]),
                                   token_logprobs=token_logprobs, first_top2=top2, first_entropy=entropy,
                                   token_ids=kept))
    return results


def answer_cloze(model, tokenizer, prompt: str, choices: list[str], label: int, chat: bool) -> Pass1Answer:
    """The option with the highest length-normalised log-likelihood."""
    scores = score_cloze_options(model, tokenizer, prompt, choices, normalize="token", add_special_tokens=not chat)
    choice = int(np.argmax(scores))
    return Pass1Answer(choices[choice], choice == label, choice=choice, option_logprobs=scores)


def answer_letter(model, tokenizer, inputs: dict, choices: list[list[str]], labels: list[int]
                  ) -> list[Pass1Answer]:
    """The most probable option letter at the answer position, among the question's letters."""
    with torch.no_grad():
        positions = position_ids_from_mask(inputs["attention_mask"])
        logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
    results = []
    for row, options in enumerate(choices):
        letter_ids = [tokenizer(f" {LETTERS[i]}", add_special_tokens=False)["input_ids"][-1]
                      for i in range(len(options))]
        option_logits = logits[row, letter_ids].float()
        choice = int(option_logits.argmax())
        top2, entropy = _first_token_stats(logits[row])
        results.append(Pass1Answer(LETTERS[choice], choice == labels[row], choice=choice,
                                   option_logprobs=option_logits.log_softmax(-1).tolist(),
                                   first_top2=top2, first_entropy=entropy))
    return results


def cache_features(read_layers: int, feature_dim: int) -> datasets.Features:
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
        "features": datasets.Array2D((read_layers, feature_dim), "float32"),
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
    }


def check_cache_identity(cache_dir: Path, identity: dict[str, Any]) -> None:
    """Raise if the cache in `cache_dir` was built for another base, other layers or another prompt setup."""
    manifest_path = cache_dir / CACHE_MANIFEST
    if not manifest_path.exists():
        return
    stored = {"read_position": "prompt", **json.loads(manifest_path.read_text())["identity"]}  # older caches
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
    (cache_dir / CACHE_MANIFEST).write_text(json.dumps({"identity": identity}, indent=2))
    doubter = peft_model.base_model
    config = peft_model.peft_config[peft_model.active_adapter]
    read_layers = doubter._plans[peft_model.active_adapter].read
    feature_dim = backbone.hidden_size(peft_model) * (2 if config.pooling == "last_mean" else 1)
    features = cache_features(len(read_layers), feature_dim)
    judge = make_judge(collect_config.judge)
    tokenizer.padding_side = "left"
    shards = [questions.select(range(s, min(s + collect_config.shard_size, len(questions))))
              for s in range(0, len(questions), collect_config.shard_size)]
    truncated = 0
    progress = tqdm(total=len(questions), desc="Collecting pass-1 answers", unit="q")
    for index, shard in enumerate(shards):
        shard_dir = cache_dir / f"shard-{index:05d}"
        if shard_dir.exists():
            progress.update(len(shard))
            continue
        rows = []
        for start in range(0, len(shard), collect_config.batch_size):
            batch = shard.select(range(start, min(start + collect_config.batch_size, len(shard))))
            rows.extend(collect_batch(peft_model, tokenizer, list(batch), prompt_config, exemplars, judge,
                                       collect_config))
            progress.update(len(batch))
        truncated += sum(row["prompt_truncated"] for row in rows)
        partial = cache_dir / f".shard-{index:05d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(partial))
        partial.rename(shard_dir)
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
    with peft_model.disable_adapter():
        base = doubter.model
        if not batch[0]["choices"]:
            with doubter.capturing_prompt(inputs["attention_mask"]) as capture:
                answers = answer_open(base, tokenizer, inputs, [e["answers"] for e in batch],
                                      [e["question"] for e in batch], judge, collect_config.max_new_tokens)
        elif prompt_config.mc_format == "cloze":
            with doubter.capturing_prompt(inputs["attention_mask"]) as capture, torch.no_grad():
                base(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]), logits_to_keep=1)
            answers = [answer_cloze(base, tokenizer, text, e["choices"], e["label"], chat)
                       for text, e in zip(texts, batch)]
        else:
            with doubter.capturing_prompt(inputs["attention_mask"]) as capture:
                answers = answer_letter(base, tokenizer, inputs, [e["choices"] for e in batch],
                                        [e["label"] for e in batch])
    pooled = capture.stacked()
    if peft_model.peft_config[peft_model.active_adapter].read_position == "answer":
        if batch[0]["choices"]:
            raise ValueError("read_position='answer' is for open-ended answers; multiple-choice runs read the prompt.")
        with peft_model.disable_adapter():
            pooled = doubter.read_answers(inputs["input_ids"], inputs["attention_mask"],
                                          [answer.token_ids for answer in answers]).stacked()
    return [
        {
            "id": example["id"], "question": example["question"], "answers": example["answers"],
            "choices": example["choices"], "label": example["label"], "split": example["split"],
            "prompt": prompt.text, "prompt_truncated": prompt.truncated, "pass1_answer": answer.text,
            "pass1_choice": answer.choice, "correct": answer.correct, "token_logprobs": answer.token_logprobs,
            "first_top2": answer.first_top2, "first_entropy": answer.first_entropy,
            "option_logprobs": answer.option_logprobs, "features": pooled[row].cpu().numpy(),
        }
        for row, (example, prompt, answer) in enumerate(zip(batch, prompts, answers))
    ]


def load_cache(cache_dir: Path) -> datasets.Dataset:
    """All finished shards of a cache, in order."""
    shard_dirs = sorted(p for p in Path(cache_dir).glob("shard-*") if p.is_dir())
    if not shard_dirs:
        raise FileNotFoundError(f"No activation cache in {cache_dir}: run `peft-doubter collect` first.")
    return datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shard_dirs])
