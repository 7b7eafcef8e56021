"""What a lookup corpus covers: the share of a run's questions with a gold answer in the top-k BM25 passages.

    python benchmarks/corpus_recall.py --run-dir RUNS/tqa-v2 [--split test] [--k 1,3] [--json out.json]

The ceiling on what the agent's lookup can rescue on those questions (`peft_doubter.agent.answer_recall`), for each
installed corpus (`names.CORPORA`). No model runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft_doubter.agent.retrieval import Corpus, answer_recall
from peft_doubter.data.collection import load_cache
from peft_doubter.names import CORPORA
from peft_doubter.runs.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", default="1,3")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = read_manifest(args.run_dir)
    cache = load_cache(args.run_dir / manifest["cache"]).select_columns(["question", "answers", "split"])
    rows = [row for row in cache if row["split"] == args.split]
    questions, answers = [row["question"] for row in rows], [row["answers"] for row in rows]
    result = {"run_dir": str(args.run_dir), "dataset": manifest["collect"]["dataset"], "split": args.split,
              "questions": len(rows), "corpora": {}}
    for name in CORPORA:
        corpus = Corpus.named(name)
        result["corpora"][name] = {"passages": len(corpus.passages)} | {
            f"recall@{k}": answer_recall(corpus, questions, answers, k=int(k)) for k in args.k.split(",")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
