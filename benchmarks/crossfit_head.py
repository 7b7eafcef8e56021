"""Cross-fitted comparison: every question of a collected run scored by models that never trained on it.

    python benchmarks/crossfit_head.py --run-dir RUNS/tqa-v2 --json results/triviaqa-v2/crossfit_head.json \
        [--folds 5] [--seed 0] [--no-option-signals]

The run's questions (every split) are cut into `--folds` stratified folds. For each fold, the Doubter's encoder with
its confidence head (`fit_confidence_head`, the run's Doubter settings with `encoder_type='attentive'`) is fit on the
other folds, its epoch chosen on a held-out 15% of them, and every baseline of the evaluation report (answer
probabilities, the probe, probe + answer probabilities, stacked logistic regression and gradient-boosted trees) is
fit on all of the other folds: every method gets the same training questions and selects its model within them
(the head holds out 15% for its epoch and does not refit on them, the probes cross-validate C and refit, the
gradient-boosted trees stop early on 10%).
Every method is compared fold by fold (the mean of the per-fold AUROCs, and the head's paired difference with
questions resampled within folds: the headline, since each fold's scores come from other models and the head's
log-odds are on another scale in each fold) and over all questions at once (pooled AUROC with a 95% interval and
paired bootstrap differences). A fold's scores are saved as it finishes
(`<json stem>.folds/`), so an interrupted run resumes, and `--only K,L` scores just those folds (processes on
different folds run side by side; a last run without it writes the summary). `--json X.json` also writes the table
X.md; the JSON stores every question's correctness, fold and every method's confidence, so each AUROC can be
recomputed from it.
No base model runs: about 15 minutes per fold of 8,000 TriviaQA questions on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from peft_doubter.data.collection import load_cache
from peft_doubter.data.sequences import cached_reading
from peft_doubter.evaluation.baselines import answer_token_summary, baseline_confidences
from peft_doubter.evaluation.confidence import pass_one_features
from peft_doubter.evaluation.metrics import auroc
from peft_doubter.evaluation.statistics import bootstrap_ci, paired_bootstrap_diff, stratified_paired_bootstrap_diff
from peft_doubter.runs.manifest import build_doubter_config, read_manifest
from peft_doubter.training.trainer import fit_confidence_head
from peft_doubter.tuner.layer import CognitiveEncoder


HEAD = "doubter_head"
ENSEMBLE = "doubter_head_ensemble"
VAL_SHARE = 0.15


def hidden(rows: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(row["features"]).reshape(-1) for row in rows])


def summary(rows: list[dict]) -> np.ndarray:
    return answer_token_summary([row["answer_states"] for row in rows], [row["token_signals"] for row in rows])


def head_log_odds(config, rows: list[dict], train_index: np.ndarray, test_index: np.ndarray, seed: int,
                  epochs: int) -> tuple[np.ndarray, int]:
    """The head's log-odds on the fold's test questions (fit on its training questions, `seed` choosing the
    initialisation and the held-out share) and the epoch it kept."""
    correct = np.array([row["correct"] for row in rows], dtype=bool)
    fit_index, val_index = train_test_split(train_index, test_size=VAL_SHARE, stratify=correct[train_index],
                                            random_state=seed)
    torch.manual_seed(seed)
    features = np.asarray(rows[0]["features"])
    encoder = CognitiveEncoder(config, features.shape[-1], features.shape[0])
    fit = fit_confidence_head(encoder, [rows[i] for i in fit_index], [rows[i] for i in val_index],
                              features_key="features", epochs=epochs, seed=seed)
    test = [rows[i] for i in test_index]
    with torch.no_grad():
        return np.concatenate([encoder.confidence_log_odds(encoder(cached_reading(test[i:i + 64]))).numpy()
                               for i in range(0, len(test), 64)]), fit.epoch


def score_fold(config, rows: list[dict], train_index: np.ndarray, test_index: np.ndarray, seed: int,
               epochs: int, head_rows: list[dict]) -> dict[str, list[float]]:
    """Every method's confidence on the fold's test questions, fit on its training questions (the head on
    `head_rows`: the same questions, maybe without what an ablation hides from it)."""
    correct = np.array([row["correct"] for row in rows], dtype=bool)
    head, epoch = head_log_odds(config, head_rows, train_index, test_index, seed, epochs)
    test, train = [rows[i] for i in test_index], [rows[i] for i in train_index]
    baselines = baseline_confidences(pass_one_features(train), correct[train_index], pass_one_features(test),
                                     hidden(train), hidden(test), seed=seed, extra_train=summary(train),
                                     extra_test=summary(test))
    return {HEAD: (1 / (1 + np.exp(-head))).tolist(), "head_epoch": epoch,
            **{name: np.asarray(scores, dtype=float).tolist() for name, scores in baselines.items()}}


def write_results(path: Path, results: dict, table: str) -> None:
    """The results as `path` (JSON) and their table beside it (`.md`), and the table printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(table)
    print(table)


def summary_markdown(results: dict) -> str:
    methods = results["methods"]
    ensemble = ENSEMBLE in methods
    lines = [(f"Cross-fitted on `{results['run_dir']}`: {results['n']} questions in {results['folds']} folds (base "
              f"accuracy {results['base_accuracy']:.3f}); every question scored by models fit on the other folds."), "",
             ("| method | mean fold AUROC | folds | head − method, fold mean (paired, within folds) [95% CI] | "
              "pooled AUROC [95% CI] | head − method, pooled [95% CI] |" + (" seed ensemble − method, fold mean |"
                                                                              if ensemble else "")),
             "|---|---|---|---|---|---|" + ("---|" if ensemble else "")]

    def paired(diff: dict | None) -> str:
        return "" if diff is None else f"{diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"

    for name, method in sorted(methods.items(), key=lambda item: -item[1]["fold_mean_auroc"]):
        low, high = method["auroc_ci"]
        lines.append(f"| {name} | {method['fold_mean_auroc']:.3f} | "
                     + " ".join(f"{a:.3f}" for a in method["fold_auroc"])
                     + f" | {paired(method.get('head_minus_method_fold_mean'))} | {method['auroc']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | {paired(method.get('head_minus_method'))} |"
                     + (f" {paired(method.get('ensemble_minus_method_fold_mean'))} |" if ensemble else ""))
    lines += ["", ("Fold mean: each fold's AUROC on its own models' scores, averaged (the head's log-odds are on "
                   "another scale in each fold, which pooling punishes); pooled: one AUROC over all questions.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="A collected answer-reading run.")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ensemble-seeds", help="Comma-separated extra seeds: also fit the head with each (its own "
                        "initialisation and held-out share) and compare the mean of all seeds' log-odds.")
    parser.add_argument("--no-option-signals", action="store_true", help="Multiple choice: the head does not read "
                        "the distribution over the options (an ablation; the baselines still do).")
    parser.add_argument("--only", help="Comma-separated folds: score just these and exit (run several processes on "
                        "different folds, then once without --only for the summary).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = read_manifest(args.run_dir)
    config = dataclasses.replace(build_doubter_config(manifest["doubter"]), encoder_type="attentive",
                                 read_position="answer", pooling="last", confidence="head")
    rows = list(load_cache(args.run_dir / manifest["cache"]).with_format("numpy"))
    head_rows = [{**row, "option_logprobs": np.zeros(0)} for row in rows] if args.no_option_signals else rows
    correct = np.array([row["correct"] for row in rows], dtype=bool)
    folds = np.zeros(len(rows), dtype=int)
    splitter = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed)
    fold_dir = args.json.with_suffix(".folds")
    fold_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, np.ndarray] = {}
    only = None if args.only is None else {int(k) for k in args.only.split(",")}
    ensemble_seeds = [int(s) for s in args.ensemble_seeds.split(",")] if args.ensemble_seeds else []
    for fold, (train_index, test_index) in enumerate(tqdm(list(splitter.split(rows, correct)), desc="folds")):
        folds[test_index] = fold
        path = fold_dir / f"fold-{fold}.json"
        if only is not None and fold not in only:
            continue
        if not path.exists():
            scored = score_fold(config, rows, train_index, test_index, args.seed, args.epochs, head_rows)
            path.write_text(json.dumps({"test_index": test_index.tolist(), **scored}))
        scored = json.loads(path.read_text())
        if scored["test_index"] != test_index.tolist():
            raise SystemExit(f"{path} was written for other folds: delete {fold_dir} to start again.")
        for extra in ensemble_seeds:
            if f"head_log_odds_seed{extra}" not in scored:  # saved seed by seed, so an interruption loses one fit
                log_odds, _ = head_log_odds(config, head_rows, train_index, test_index, extra, args.epochs)
                scored[f"head_log_odds_seed{extra}"] = log_odds.tolist()
                path.write_text(json.dumps(scored))
        if only is not None:
            continue
        for name, values in scored.items():
            if name not in ("test_index", "head_epoch") and not name.startswith("head_log_odds_seed"):
                scores.setdefault(name, np.full(len(rows), np.nan))[test_index] = values
        if ensemble_seeds:  # the mean of every seed's log-odds (the first seed's recovered from its confidence)
            first = np.asarray(scored[HEAD])
            members = [np.log(first / (1 - first))] + [np.asarray(scored[f"head_log_odds_seed{s}"])
                                                        for s in ensemble_seeds]
            scores.setdefault(ENSEMBLE, np.full(len(rows), np.nan))[test_index] = 1 / (1 + np.exp(-np.mean(members, 0)))

    if only is not None:
        return
    methods = {}
    for name, confidence in scores.items():
        methods[name] = {
            "auroc": auroc(correct, confidence), "auroc_ci": bootstrap_ci(auroc, correct, confidence),
            "fold_auroc": [auroc(correct[folds == k], confidence[folds == k]) for k in range(args.folds)],
            "confidence": confidence.tolist(),
        }
        methods[name]["fold_mean_auroc"] = float(np.mean(methods[name]["fold_auroc"]))
        if name not in (HEAD, ENSEMBLE):
            methods[name]["head_minus_method"] = paired_bootstrap_diff(auroc, correct, scores[HEAD], confidence)
            methods[name]["head_minus_method_fold_mean"] = stratified_paired_bootstrap_diff(
                auroc, correct, scores[HEAD], confidence, folds)
            if ENSEMBLE in scores:
                methods[name]["ensemble_minus_method_fold_mean"] = stratified_paired_bootstrap_diff(
                    auroc, correct, scores[ENSEMBLE], confidence, folds)
    results = {"run_dir": str(args.run_dir), "n": len(rows), "folds": args.folds, "seed": args.seed,
               "epochs": args.epochs, "ensemble_seeds": ensemble_seeds, "no_option_signals": args.no_option_signals,
               "base_accuracy": float(correct.mean()),
               "correct": correct.tolist(),
               "fold": folds.tolist(), "methods": methods}
    write_results(args.json, results, summary_markdown(results))


if __name__ == "__main__":
    main()
