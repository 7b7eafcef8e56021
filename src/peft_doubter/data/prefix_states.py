"""The hidden states entering the first inject layer, cached once per sequence (prompt + target).

Nothing is injected below the first inject layer, so those layers compute the same numbers in every epoch and in
every scoring pass; with the states cached, training and confidence scoring start pass 2 there
(`DoubterModel.forward(prefix_hidden=...)`). They are stored in float32: Gemma 3's residual stream reaches 9e4 at
layer 11, beyond float16, and bfloat16's three digits break the equality with the full pass 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..names import CACHE_MANIFEST
from ..paths import read_json, write_json
from ..tuner import backbone
from .shards import build_shards, finished_rows, load_shards


def prefix_identity(peft_model) -> dict[str, Any]:
    """What the cached states depend on besides the sequences themselves: the base and the first inject layer."""
    doubter = peft_model.base_model
    return {"base_fingerprint": backbone.fingerprint(doubter.model),
            "first_inject": doubter._plans[peft_model.active_adapter].first_inject}


def prefix_states(peft_model, sequences: datasets.Dataset, directory: Path, batch_size: int = 16,
                  shard_size: int = 512) -> datasets.Dataset:
    """A dataset with a `prefix_hidden` column (S, H) aligned with `sequences` (which has `input_ids`), built on
    first use (resumable) and read from `directory` afterwards. A cache built for another base, another first
    inject layer or other sequences is refused."""
    directory = Path(directory)
    identity = prefix_identity(peft_model)
    manifest = directory / CACHE_MANIFEST
    if manifest.exists():
        stored = read_json(manifest)["identity"]
        problems = backbone.fingerprint_mismatch(stored["base_fingerprint"], identity["base_fingerprint"])
        if stored["first_inject"] != identity["first_inject"]:
            problems.append(f"first inject layer {stored['first_inject']} instead of {identity['first_inject']}")
        if problems:
            raise ValueError(f"The lower-layer states in {directory} were built for another model: "
                             + "; ".join(problems) + ". Delete the folder to rebuild them.")
    directory.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"identity": identity})
    doubter = peft_model.base_model
    hidden = backbone.hidden_size(doubter.model)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "prefix_hidden": datasets.Array2D((None, hidden), "float32")})
    device = doubter.model.get_input_embeddings().weight.device
    progress = tqdm(total=len(sequences), desc="Caching lower-layer states", unit="seq",
                    initial=min(len(sequences), finished_rows(directory, shard_size)))

    def produce(start: int, end: int) -> list[dict]:
        ids = sequences.select(range(start, end))["input_ids"]
        states: list[Any] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for first in range(0, len(order), batch_size):
            chosen = order[first:first + batch_size]
            width = max(len(ids[i]) for i in chosen)
            batch = torch.zeros((len(chosen), width), dtype=torch.long)
            mask = torch.zeros_like(batch)
            for row, index in enumerate(chosen):
                batch[row, width - len(ids[index]):] = torch.as_tensor(ids[index])
                mask[row, width - len(ids[index]):] = 1
            with peft_model.disable_adapter():
                hidden_states = doubter.lower_layer_states(batch.to(device), mask.to(device)).float().cpu()
            for row, index in enumerate(chosen):
                states[index] = hidden_states[row, width - len(ids[index]):].numpy()
            progress.update(len(chosen))
        return [{"input_ids": row_ids, "prefix_hidden": state} for row_ids, state in zip(ids, states)]

    build_shards(directory, len(sequences), shard_size, produce, features)
    progress.close()
    cached = load_shards(directory, f"No lower-layer states in {directory}.")
    if len(cached) != len(sequences) or cached["input_ids"] != sequences["input_ids"]:
        raise ValueError(f"The lower-layer states in {directory} were built for other sequences (other questions, "
                         "targets or prompts). Delete the folder to rebuild them.")
    return cached.remove_columns("input_ids")


def attach_prefix_states(peft_model, rows: datasets.Dataset, directory: Path) -> datasets.Dataset:
    """`rows` with their cached lower-layer states as a `prefix_hidden` column (see `prefix_states`); unchanged when
    the first inject layer is layer 0 (nothing below it to skip)."""
    if peft_model.base_model._plans[peft_model.active_adapter].first_inject == 0:
        return rows
    return datasets.concatenate_datasets([rows, prefix_states(peft_model, rows, directory)], axis=1)
