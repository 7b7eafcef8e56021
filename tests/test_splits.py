"""Question-level splits, overlap detection and exemplar/evaluation disjointness."""

import functools
import json
import operator

import datasets
import pytest

from peft_doubter.data.splits import assert_disjoint, check_no_overlap, split_by_question


def make(n: int, duplicates: int = 0) -> datasets.Dataset:
    questions = [f"Question number {i}?" for i in range(n)]
    questions += [f"the  QUESTION number {i}" for i in range(duplicates)]  # same normalized text as i
    return datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(len(questions))], "question": questions})


def test_split_counts_manifest_and_determinism():
    ds = make(200)
    splits, manifest = split_by_question(ds, seed=3)
    assert list(splits) == ["train", "val", "test"]
    assert manifest["counts"] == {"train": 160, "val": 20, "test": 20}
    assert json.loads(json.dumps(manifest)) == manifest
    assert manifest["ids"]["test"] == sorted(splits["test"]["id"])
    _, manifest_again = split_by_question(ds.shuffle(seed=1), seed=3)  # row order does not matter
    assert manifest_again["ids_sha256"] == manifest["ids_sha256"]
    _, other = split_by_question(ds, seed=4)
    assert other["ids_sha256"]["test"] != manifest["ids_sha256"]["test"]
    all_ids = functools.reduce(operator.iadd, (manifest["ids"][s] for s in splits), [])
    assert sorted(all_ids) == sorted(ds["id"])


def test_duplicate_questions_stay_in_one_split():
    ds = make(100, duplicates=30)
    splits, _ = split_by_question(ds, fractions={"train": 0.5, "test": 0.5}, seed=0)
    check_no_overlap(splits)
    for name, split in splits.items():
        numbers = [q.split()[-1].rstrip("?") for q in split["question"]]
        other = splits["test" if name == "train" else "train"]
        assert not set(numbers) & {q.split()[-1].rstrip("?") for q in other["question"]}


def test_overlap_is_detected_with_examples():
    train = datasets.Dataset.from_dict({"id": ["a", "b"], "question": ["What is the capital of France?", "x"]})
    test = datasets.Dataset.from_dict({"id": ["c"], "question": ["what is capital of france"]})
    with pytest.raises(ValueError, match=r"'train' and 'test' share 1 questions.*what is capital of france"):
        check_no_overlap({"train": train, "test": test})
    check_no_overlap({"train": train, "test": [{"question": "y"}]})


def test_bad_arguments():
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_question(make(10), fractions={"train": 0.7, "test": 0.2})
    dup = datasets.Dataset.from_dict({"id": ["a", "a"], "question": ["x", "y"]})
    with pytest.raises(ValueError, match="duplicate ids"):
        split_by_question(dup)


def test_assert_disjoint():
    assert_disjoint(["mmlu/dev/a/0"], ["mmlu/test/a/0"])
    with pytest.raises(ValueError, match=r"1 exemplar ids .*mmlu/test/a/0"):
        assert_disjoint(["mmlu/test/a/0", "x"], ["mmlu/test/a/0"])
