"""Leave-one-dataset-out: the confidence head trained on several open-QA sources, tested on a dataset none of them is.

    python benchmarks/leave_one_dataset_out.py --run-dirs RUNS/tqa-v2 RUNS/sciq-open-answer RUNS/nq-open-answer \
        --json results/leave-one-dataset-out/report.json [--reference triviaqa]

Each run is one collected answer-reading dataset (the same model, prompt setup and reading: checked). For each
dataset in turn, every question of it is scored by models fit on every question of the others: the Doubter's
encoder with its confidence head (`fit_confidence_head`, epoch chosen on a held-out 15% of the training questions)
and every baseline of the evaluation report (answer probabilities, the probe, probe + answer probabilities, stacked
logistic regression and gradient-boosted trees), all fit on the same training questions. Beside them, the head fit
on the `--reference` dataset alone (single-source training, as the zero-shot reports do) shows what the other
sources add. A held-out dataset's scores are saved as they finish (`<json stem>.held_out/`), so an interrupted run
resumes. `--json X.json` also writes the table X.md; the JSON stores every question's correctness and every
method's confidence, so each AUROC can be recomputed from it. No base model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from crossfit_head import HEAD, head_log_odds, score_fold, write_results
from tqdm.auto import tqdm

from peft_doubter.data.collection import load_cache
from peft_doubter.evaluation.metrics import auroc
from peft_doubter.evaluation.statistics import bootstrap_ci, paired_bootstrap_diff
from peft_doubter.runs.manifest import READ_SIDE, build_doubter_config, read_manifest


SINGLE = "doubter_head_single_source"


def load_sources(run_dirs: list[Path]) -> tuple[dict[str, list[dict]], dict]:
    """Each run's dataset name -> its questions, refusing runs that were not collected alike."""
    sources, first = {}, None
    for run_dir in run_dirs:
        manifest = read_manifest(run_dir)
        setup = {"model": manifest["collect"]["model"], "max_new_tokens": manifest["collect"]["max_new_tokens"],
                 "prompt": manifest["prompt"], **{key: manifest["doubter"][key] for key in READ_SIDE}}
        if setup["read_position"] != "answer":
            raise SystemExit(f"{run_dir} reads the prompt: the head needs answer-reading runs.")
        if first is not None and setup != first[1]:
            raise SystemExit(f"{run_dir} was collected differently from {first[0]}: {setup} vs {first[1]}.")
        first = first or (run_dir, setup, manifest)
        name = manifest["collect"]["dataset"]
        if name in sources:
            raise SystemExit(f"Two runs of {name}: give one run per dataset.")
        sources[name] = list(load_cache(run_dir / manifest["cache"]).with_format("numpy"))
    return sources, first[2]


def markdown(results: dict) -> str:
    lines = [("Leave-one-dataset-out: each dataset's questions scored by models fit on all the other datasets' "
              "questions."), ""]
    for name, held in results["held_out"].items():
        lines += [(f"**{name}** held out: {held['n']} questions, base accuracy {held['base_accuracy']:.3f}; trained "
                   f"on {', '.join(held['trained_on'])} ({held['n_train']} questions)."), "",
                  "| method | AUROC [95% CI] | head − method [95% CI] |", "|---|---|---|"]
        for method, row in sorted(held["methods"].items(), key=lambda item: -item[1]["auroc"]):
            low, high = row["auroc_ci"]
            diff = row.get("head_minus_method")
            paired = "" if diff is None else f"{diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
            lines.append(f"| {method} | {row['auroc']:.3f} [{low:.3f}, {high:.3f}] | {paired} |")
        lines.append("")
    lines.append(f"`{SINGLE}`: the head fit on {results['reference']} alone (where it is not the held-out set).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dirs", type=Path, nargs="+", required=True, help="One collected run per dataset.")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--reference", default="triviaqa", help="The single source the multi-source head is "
                        "compared with.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if len(args.run_dirs) < 3:
        raise SystemExit("Give at least three datasets: each is held out while the others train.")

    sources, manifest = load_sources(args.run_dirs)
    config = dataclasses.replace(build_doubter_config(manifest["doubter"]), encoder_type="attentive",
                                 read_position="answer", pooling="last", confidence="head")
    names = list(sources)
    rows = [row for name in names for row in sources[name]]
    origin = np.array([name for name in names for _ in sources[name]])
    correct = np.array([row["correct"] for row in rows], dtype=bool)
    out_dir = args.json.with_suffix(".held_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    held_out = {}
    for name in tqdm(names, desc="held-out datasets"):
        test_index, train_index = np.flatnonzero(origin == name), np.flatnonzero(origin != name)
        path = out_dir / f"{name}.json"
        if not path.exists():
            scored = score_fold(config, rows, train_index, test_index, args.seed, args.epochs)
            if name != args.reference:
                single, _ = head_log_odds(config, rows, np.flatnonzero(origin == args.reference), test_index,
                                          args.seed, args.epochs)
                scored[SINGLE] = (1 / (1 + np.exp(-single))).tolist()
            path.write_text(json.dumps(scored))
        scored = json.loads(path.read_text())
        truth = correct[test_index]
        methods = {}
        for method, values in scored.items():
            if method == "head_epoch":
                continue
            confidence = np.asarray(values, dtype=float)
            methods[method] = {"auroc": auroc(truth, confidence), "auroc_ci": bootstrap_ci(auroc, truth, confidence),
                               "confidence": confidence.tolist()}
            if method != HEAD:
                methods[method]["head_minus_method"] = paired_bootstrap_diff(auroc, truth, np.asarray(scored[HEAD]),
                                                                             confidence)
        held_out[name] = {"n": len(test_index), "n_train": len(train_index), "trained_on": [n for n in names if n != name],
                          "base_accuracy": float(truth.mean()), "head_epoch": scored["head_epoch"],
                          "correct": truth.tolist(), "methods": methods}
    results = {"run_dirs": [str(p) for p in args.run_dirs], "reference": args.reference, "seed": args.seed,
               "epochs": args.epochs, "held_out": held_out}
    write_results(args.json, results, markdown(results))


if __name__ == "__main__":
    main()
