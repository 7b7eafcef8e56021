"""Ablation: the Doubter's encoder with a linear confidence head, no injection path.

    python benchmarks/encoder_head_ablation.py --run-dir RUNS/v2/answer-attentive-decision-bce-seed0 \
        --json results/triviaqa-v2/encoder_head.json [--seeds 0,1,2] [--encoders attentive,selective]

The Doubter's confidence is read from the base's LM head in pass 2, after the cognitive tokens went through
cross-attention. Does the encoder's reading hold the signal the free baselines find? This trains the run's own
encoder (same settings, same cached pass-1 reading: for `attentive` the answer tokens' states and signals) with a
linear head on the mean of its tokens, by binary cross-entropy on the run's train split, keeps the epoch with the
best validation AUROC, and tests it on the run's test questions beside the scores the run's evaluation report stored
for every method on the same questions (paired bootstrap differences); `--json X.json` also writes the table X.md.
On a prompt-reading run the `attentive` encoder's per-layer tokens are the prompt's last token (the answer's tokens
are cached either way). No base model runs: minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from peft_doubter.data.collection import load_cache
from peft_doubter.data.sequences import cached_reading
from peft_doubter.evaluation.metrics import auroc
from peft_doubter.evaluation.statistics import bootstrap_ci, paired_bootstrap_diff
from peft_doubter.names import EVAL_DIR, REPORT_JSON
from peft_doubter.runs.manifest import build_doubter_config, read_manifest
from peft_doubter.training.trainer import fit_confidence_head
from peft_doubter.tuner.layer import CognitiveEncoder


def train_one(config, rows: dict[str, list[dict]], seed: int, epochs: int, lr: float, batch_size: int) -> dict:
    """The run's encoder with a confidence head, fit as `DoubterSFTConfig(fit_confidence_head=True)` fits it."""
    torch.manual_seed(seed)
    features = np.asarray(rows["train"][0]["features"])
    encoder = CognitiveEncoder(dataclasses.replace(config, confidence="head"), features.shape[-1], features.shape[0])
    fit = fit_confidence_head(encoder, rows["train"], rows["val"], features_key="features", epochs=epochs,
                              learning_rate=lr, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        test_logits = np.concatenate([encoder.confidence_log_odds(encoder(cached_reading(rows["test"][i:i + 64])))
                                      .numpy() for i in range(0, len(rows["test"]), 64)])
    return {"val_auroc": fit.val_auroc, "epoch": fit.epoch, "test_logits": test_logits}


COMPARED = ("doubter", "p_min_token", "p_sequence", "probe", "probe+answer_prob", "stacked_lr", "stacked_gbm")


def summary_markdown(results: dict) -> str:
    """A table: each variant's test AUROC with its interval and its paired difference against the run's methods."""
    lines = [f"Encoder + linear head on `{results['run_dir']}` ({results['n_train']} train, {results['n_val']} val, "
             f"{results['n_test']} test). Test AUROC of the run's methods: "
             + ", ".join(f"{name} {results['baselines_test_auroc'][name]:.3f}" for name in COMPARED) + ".", "",
             "| variant | epoch | val AUROC | test AUROC [95% CI] | "
             + " | ".join(f"vs {name}" for name in COMPARED) + " |",
             "|---" * (4 + len(COMPARED)) + "|"]
    for name, variant in results["variants"].items():
        low, high = variant["test_auroc_ci"]
        diffs = [variant["paired_vs"][m] for m in COMPARED]
        lines.append(f"| {name} | {variant['epoch']} | {variant['val_auroc']:.3f} | {variant['test_auroc']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | "
                     + " | ".join(f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--encoders", default="attentive,selective")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = read_manifest(args.run_dir)
    report = json.loads((args.run_dir / EVAL_DIR / REPORT_JSON).read_text())
    cache = load_cache(args.run_dir / manifest["cache"]).with_format("numpy")
    rows = {split: [cache[int(i)] for i in np.flatnonzero(np.asarray(cache["split"]) == split)]
            for split in ("train", "val", report["meta"]["split"])}
    rows["test"] = rows.pop(report["meta"]["split"])
    test_correct = np.array([r["correct"] for r in rows["test"]], dtype=bool)
    if test_correct.tolist() != [bool(c) for c in report["correct"]]:
        raise SystemExit("The report's questions are not the cache's test rows in order.")

    base_config = build_doubter_config(manifest["doubter"])
    results = {"run_dir": str(args.run_dir), "n_train": len(rows["train"]), "n_val": len(rows["val"]),
               "n_test": len(rows["test"]), "settings": {k: v for k, v in vars(args).items() if k != "json"}
               | {"run_dir": str(args.run_dir)}, "variants": {}}
    baselines = {name: np.asarray(method["scores"], dtype=float)
                 for name, method in report["scores"].items()}  # AUROC needs only their order
    for encoder in args.encoders.split(","):
        # `attentive` reads the answer's tokens; on a prompt-reading run its layer tokens are the prompt's last token
        reads = "answer" if encoder == "attentive" else base_config.read_position
        config = dataclasses.replace(base_config, encoder_type=encoder, read_position=reads, pooling="last")
        per_seed = [train_one(config, rows, int(seed), args.epochs, args.lr, args.batch_size)
                    for seed in args.seeds.split(",")]
        for seed, outcome in zip(args.seeds.split(","), per_seed):
            confidence = 1 / (1 + np.exp(-outcome["test_logits"]))
            results["variants"][f"{encoder}-head-seed{seed}"] = {
                "encoder": encoder, "seed": int(seed), "epoch": outcome["epoch"], "val_auroc": outcome["val_auroc"],
                "test_auroc": auroc(test_correct, confidence),
                "test_auroc_ci": bootstrap_ci(auroc, test_correct, confidence),
                "paired_vs": {name: paired_bootstrap_diff(auroc, test_correct, confidence, scores)
                              for name, scores in baselines.items()},
                "confidence": confidence.tolist(),
            }
            print(f"{encoder} seed {seed}: epoch {outcome['epoch']}, val {outcome['val_auroc']:.3f}, "
                  f"test {auroc(test_correct, confidence):.3f}", flush=True)
    results["baselines_test_auroc"] = {name: auroc(test_correct, scores) for name, scores in baselines.items()}
    results["test_correct"] = test_correct.tolist()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    args.json.with_suffix(".md").write_text(summary_markdown(results))


if __name__ == "__main__":
    main()
