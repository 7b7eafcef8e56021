"""Shared test setup: one torch thread (tiny ops on a loaded 2-core machine are far slower with two)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


torch.set_num_threads(1)

from threadpoolctl import threadpool_limits  # noqa: E402


threadpool_limits(1)  # numpy / scikit-learn BLAS as well
