"""Question-level splits: the same normalized question never lands in two splits.

Questions are grouped by :func:`peft_doubter.data.scoring.normalize_answer` of their text (lowercase, no
punctuation or articles, collapsed whitespace), so repeated questions (MMLU test holds 14,042 rows but
13,869 distinct question texts) stay together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import numpy as np

from .scoring import normalize_answer


DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def _ids_sha256(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def split_by_question(
    dataset: datasets.Dataset,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    question_column: str = "question",
    id_column: str = "id",
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Split ``dataset`` by normalized question text into ``fractions`` (of rows, approximately).

    Groups of identical normalized questions are shuffled with ``seed`` (independently of the row order)
    and dealt out in order of the fractions' keys. Returns the splits (rows keep their original order)
    and a JSON-serializable manifest: seed, fractions, row counts, sorted ids and their sha256 per split.
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if not fractions or any(f <= 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    ids = list(dataset[id_column])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Column {id_column!r} has duplicate ids; ids must be unique to split")

    groups: dict[str, list[int]] = {}
    for i, question in enumerate(dataset[question_column]):
        groups.setdefault(normalize_answer(question), []).append(i)
    keys = sorted(groups, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    order = np.random.default_rng(seed).permutation(len(keys))

    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names]) * len(dataset)
    indices: dict[str, list[int]] = {n: [] for n in names}
    assigned, slot = 0, 0
    for k in order:
        rows = groups[keys[k]]
        while slot < len(names) - 1 and assigned >= bounds[slot] - 1e-9:
            slot += 1
        indices[names[slot]].extend(rows)
        assigned += len(rows)

    splits = datasets.DatasetDict({n: dataset.select(sorted(idx)) for n, idx in indices.items()})
    split_ids = {n: sorted(ids[i] for i in idx) for n, idx in indices.items()}
    manifest = {
        "seed": seed,
        "fractions": fractions,
        "grouping": "normalize_answer(question)",
        "counts": {n: len(idx) for n, idx in indices.items()},
        "ids": split_ids,
        "ids_sha256": {n: _ids_sha256(v) for n, v in split_ids.items()},
    }
    return splits, manifest


def _column(rows: datasets.Dataset | Iterable[Mapping[str, Any]], column: str) -> list[Any]:
    if isinstance(rows, datasets.Dataset):
        return list(rows[column])
    return [row[column] for row in rows]


def check_no_overlap(
    splits: Mapping[str, datasets.Dataset | Iterable[Mapping[str, Any]]],
    question_column: str = "question",
    max_examples: int = 5,
) -> None:
    """Raise ``ValueError`` (with examples) if two splits share a normalized question text."""
    questions = {name: {normalize_answer(q) for q in _column(ds, question_column)} for name, ds in splits.items()}
    problems = []
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(questions[a] & questions[b])
            if shared:
                problems.append(f"{a!r} and {b!r} share {len(shared)} questions, e.g. {shared[:max_examples]}")
    if problems:
        raise ValueError("Question overlap between splits: " + "; ".join(problems))


def assert_disjoint(exemplar_pool_ids: Iterable[str], eval_ids: Iterable[str], max_examples: int = 5) -> None:
    """Raise ``ValueError`` if any exemplar id is also an evaluated id."""
    shared = sorted(set(exemplar_pool_ids) & set(eval_ids))
    if shared:
        raise ValueError(
            f"{len(shared)} exemplar ids are also evaluated, e.g. {shared[:max_examples]}; "
            "use an exemplar pool disjoint from the evaluation questions"
        )
