"""How much correctness signal sits in the hidden state at the end of the base's OWN answer, against the state at
the end of the prompt that the Doubter reads (pass 1), on the same questions of a collected run.

    python benchmarks/probe_answer_end.py --run-dir runs/triviaqa --json results/answer_end_probe.json

For every cached train and test question, runs the frozen base over prompt + its own greedy pass-1 answer and takes
the read layers' hidden states at the answer's last token. Fits the same cross-validated logistic probe as the
evaluation on the train split and reports test AUROC with bootstrap intervals for: the prompt-state probe (what the
Doubter reads), the answer-end probe, and the answer-end probe plus answer-probability features, with paired
differences. A diagnostic for the next design step, not a method the library ships.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from peft_doubter.baselines import LogisticProbe, answer_feature_matrix
from peft_doubter.collect import load_cache
from peft_doubter.evaluation import pass1_answer_text, pass_one_features
from peft_doubter.metrics import auroc, bootstrap_ci, paired_bootstrap_diff
from peft_doubter.model import position_ids_from_mask
from peft_doubter.run import load_run_model
from peft_doubter.targets import tokenize_example


@torch.no_grad()
def answer_end_features(model, tokenizer, rows, mc_format: str, chat: bool, batch_size: int) -> np.ndarray:
    """Pooled read-layer states (N, R*D) at the last token of each row's own pass-1 answer (left-padded batches)."""
    doubter = model.base_model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="Answer-end states", unit="batch"):
        batch = rows[start:start + batch_size]
        # Drop the end marker tokenize_example appends: read at the answer's last token.
        ids = [tokenize_example(tokenizer, r["prompt"], pass1_answer_text(r, mc_format), chat)["input_ids"][:-1]
               for r in batch]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.as_tensor(seq)
            mask[row, width - len(seq):] = 1
        with model.disable_adapter():
            capture = doubter.run_pass1(input_ids, mask, torch.full((len(ids),), width - 1), keep_prefix=False,
                                        position_ids=position_ids_from_mask(mask))
        out.append(capture.stacked().reshape(len(ids), -1).float().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train", type=int, help="Use only the first N train questions.")
    parser.add_argument("--max-test", type=int, help="Use only the first N test questions.")
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, tokenizer, manifest = load_run_model(args.run_dir, adapter=False)  # pass 1 needs no trained weights
    mc_format, chat = manifest["prompt"]["mc_format"], manifest["prompt"]["style"] == "chat"
    cache = load_cache(Path(args.run_dir) / "cache")
    train = [r for r in cache if r["split"] == "train"][: args.max_train]
    test = [r for r in cache if r["split"] == "test"][: args.max_test]
    y_train = np.array([r["correct"] for r in train], dtype=bool)
    y_test = np.array([r["correct"] for r in test], dtype=bool)

    prompt_state = {name: np.stack([np.asarray(r["features"]).reshape(-1) for r in rows])
                    for name, rows in (("train", train), ("test", test))}
    answer_state = {name: answer_end_features(model, tokenizer, rows, mc_format, chat, args.batch_size)
                    for name, rows in (("train", train), ("test", test))}
    answer_prob = {name: answer_feature_matrix(pass_one_features(rows)) for name, rows in (("train", train),
                                                                                          ("test", test))}
    inputs = {
        "probe (prompt state, what the Doubter reads)": prompt_state,
        "probe (answer-end state)": answer_state,
        "probe (answer-end state + answer probabilities)": {
            k: np.hstack([answer_state[k], answer_prob[k]]) for k in ("train", "test")},
    }
    scores = {name: LogisticProbe().fit(x["train"], y_train).predict_proba(x["test"]) for name, x in inputs.items()}
    reference = "probe (prompt state, what the Doubter reads)"
    results = {"run_dir": str(args.run_dir), "train": len(train), "test": len(test),
               "test_accuracy": float(y_test.mean()), "methods": {}}
    for name, score in scores.items():
        low, high = bootstrap_ci(auroc, y_test, score, n_resamples=args.n_resamples)
        entry = {"auroc": auroc(y_test, score), "ci_low": low, "ci_high": high}
        if name != reference:
            entry["minus_prompt_probe"] = paired_bootstrap_diff(auroc, y_test, score, scores[reference],
                                                                n_resamples=args.n_resamples)
        results["methods"][name] = entry
        print(f"{name}: AUROC {entry['auroc']:.3f} [{low:.3f}, {high:.3f}]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
