"""Resumable caches on disk: rows written as `datasets` shards (`shard-00000`, ...), each renamed into place only
when complete, so an interrupted build resumes after its last finished shard."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import datasets


SHARD_GLOB = "shard-*"


def build_shards(directory: Path, total: int, shard_size: int, produce: Callable[[int, int], list[dict]],
                 features: datasets.Features) -> None:
    """Write rows [0, total) in shards of `shard_size`: `produce(start, end)` returns the rows of one shard.
    Finished shards are kept and skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, total, shard_size)):
        shard = directory / f"shard-{index:05d}"
        if shard.exists():
            continue
        rows = produce(start, min(start + shard_size, total))
        partial = directory / f".shard-{index:05d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(partial))
        partial.rename(shard)


def finished_rows(directory: Path, shard_size: int) -> int:
    """How many rows the finished shards hold (every shard but the last is full)."""
    return len(list(Path(directory).glob(SHARD_GLOB))) * shard_size


def load_shards(directory: Path, missing: str) -> datasets.Dataset:
    """All finished shards in order; `missing` is the error message when there are none."""
    shards = sorted(p for p in Path(directory).glob(SHARD_GLOB) if p.is_dir())
    if not shards:
        raise FileNotFoundError(missing)
    return datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards])
