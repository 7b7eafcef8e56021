"""Make a `read_position='answer'` run from a collected prompt-reading run, on exactly the same questions.

    python benchmarks/reread_answers.py --from-run runs/triviaqa --run-dir runs/triviaqa-answer [--max-train 2000]
    peft-doubter train --run-dir runs/triviaqa-answer --num-train-epochs 1
    peft-doubter eval  --run-dir runs/triviaqa-answer

Collection already holds each question's prompt and the base's own greedy answer; this recomputes only the pass-1
features, at the last token of prompt + answer (the answer re-tokenized the way training appends targets), and
writes a new run with the same splits, answers, correctness and baseline features. A paired comparison of the two
read positions then costs a few minutes instead of a second collection. (`peft-doubter collect --read-position
answer` collects such a run directly, with the generated tokens.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from peft_doubter.data.collection import load_cache
from peft_doubter.data.sequences import tokenize_example
from peft_doubter.names import CACHE_MANIFEST
from peft_doubter.runs.manifest import read_manifest, write_manifest
from peft_doubter.runs.stages import load_run_model


def _answer_ids(tokenizer, prompt: str, answer: str, chat: bool) -> list[int]:
    """The answer's tokens as training appends a target to the prompt, without the end marker."""
    if not answer:
        return []
    row = tokenize_example(tokenizer, prompt, answer, chat)
    return [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100][:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, required=True, help="A collected run that reads the prompt.")
    parser.add_argument("--run-dir", type=Path, required=True, help="The new run (must not exist).")
    parser.add_argument("--max-train", type=int, help="Keep only the first N train questions (val/test stay whole).")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)

    source = read_manifest(args.from_run)
    if source["doubter"].get("read_position", "prompt") != "prompt":
        raise SystemExit(f"{args.from_run} already reads the answer.")
    if (args.run_dir / "run.json").exists() and read_manifest(args.run_dir).get("reread_from") == {
            "run": str(args.from_run), "max_train": args.max_train}:
        print(f"{args.run_dir} was already made from {args.from_run}; nothing to do.")
        return
    if args.run_dir.exists():
        raise SystemExit(f"{args.run_dir} exists but is no finished re-read of {args.from_run}: remove it or choose "
                         "another directory.")
    cache = load_cache(args.from_run / source["cache"])
    if any(len(choices) for choices in cache["choices"]):
        raise SystemExit("read_position='answer' is for open-ended answers.")
    model, tokenizer, _ = load_run_model(args.from_run, adapter=False)
    doubter = model.base_model
    train_ids = [i for i, split in enumerate(cache["split"]) if split == "train"][: args.max_train]
    keep = sorted(set(train_ids) | {i for i, split in enumerate(cache["split"]) if split != "train"})
    cache = cache.select(keep)

    tokenizer.padding_side = "left"
    chat = source["prompt"]["style"] == "chat"
    features = []
    for start in tqdm(range(0, len(cache), args.batch_size), desc="Reading answer ends", unit="batch"):
        rows = cache.select(range(start, min(start + args.batch_size, len(cache))))
        inputs = tokenizer(list(rows["prompt"]), return_tensors="pt", padding=True, add_special_tokens=not chat)
        answer_ids = [_answer_ids(tokenizer, p, a, chat) for p, a in zip(rows["prompt"], rows["pass1_answer"])]
        with model.disable_adapter():
            features.append(doubter.read_answers(inputs["input_ids"], inputs["attention_mask"], answer_ids)
                            .stacked().float().numpy())
    features = np.concatenate(features)

    args.run_dir.mkdir(parents=True)
    cache_dir = args.run_dir / "cache"
    rows = [{**row, "features": features[i]} for i, row in enumerate(cache)]
    datasets.Dataset.from_list(rows, features=cache.features).save_to_disk(str(cache_dir / "shard-00000"))
    identity = json.loads((args.from_run / source["cache"] / CACHE_MANIFEST).read_text())["identity"]
    (cache_dir / CACHE_MANIFEST).write_text(json.dumps({"identity": {**identity, "read_position": "answer"}},
                                                       indent=2))
    manifest = {key: value for key, value in source.items() if key not in ("train", "evaluations", "adapter")}
    manifest["doubter"] = {**source["doubter"], "read_position": "answer"}
    manifest["cache"] = "cache"
    manifest["reread_from"] = {"run": str(args.from_run), "max_train": args.max_train}
    splits = cache["split"]
    manifest["cache_summary"] = {
        split: {"questions": splits.count(split),
                "base_accuracy": float(np.mean([c for s, c in zip(splits, cache["correct"]) if s == split]))}
        for split in ("train", "val", "test")
    } | {"prompts_truncated": source["cache_summary"].get("prompts_truncated", 0)}
    write_manifest(args.run_dir, manifest)
    print(f"{args.run_dir}: {len(cache)} questions ({splits.count('train')} train), features at the answer's end.")


if __name__ == "__main__":
    main()
