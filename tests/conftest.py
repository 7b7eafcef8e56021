"""Shared test setup: one torch thread (tiny ops on a loaded 2-core machine are far slower with two)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


torch.set_num_threads(1)

from threadpoolctl import threadpool_limits  # noqa: E402


threadpool_limits(1)  # numpy / scikit-learn BLAS as well


import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline run, trained for one epoch and evaluated, with a corpus holding some answers."""
    import tiny_run

    from peft_doubter.data.collection import load_cache
    from peft_doubter.evaluation.protocol import EvalConfig
    from peft_doubter.runs import stages

    space = tiny_run.make_workspace(tmp_path_factory.mktemp("trained"))
    stages.train_run(space["run"], {"num_train_epochs": 1, "probe_epochs": 1, "per_device_train_batch_size": 8})
    stages.eval_run(space["run"], EvalConfig(text_behaviour="none", n_resamples=20))
    cache = load_cache(space["run"] / "cache")
    corpus = space["root"] / "corpus.jsonl"
    with open(corpus, "w") as handle:
        for index, row in enumerate(cache):
            if index % 3 == 0:  # every third question's gold answer is in the corpus, next to its words
                handle.write(json.dumps({"id": f"p{index}", "text": f"{row['question']} {row['answers'][0]}"}) + "\n")
    return {**space, "corpus": corpus}
