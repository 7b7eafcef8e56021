"""Train and evaluate Doubter variants on the questions of one collected run: the table of variants tried.

    python benchmarks/doubter_variants.py --from-run RUNS/tqa-v2 --out RUNS/variants [--variants a,b] [--seeds 0,1,2]

Every variant trains on the same train split, selects checkpoints on the same validation split and is tested on the
same test questions, beside the same baselines (`peft-doubter eval --text-behaviour none`: ranking and risk control,
no text generation). A variant is: where pass 1 reads (the prompt's last token or the answer's), the encoder, which
confidence is evaluated (`ratio`: P(answer) vs P(refusal); `decision`: the refusal's probability at the first answer
position; `head`: a linear unit on the encoder's cognitive tokens, no pass 2) and whether that confidence is trained
directly (BCE + pairwise ranking) or only through the LM loss; `-fit` variants fit the encoder and head on the
confidence first and freeze them for the LM stage (`fit_confidence_head`); `-only` stops there
(`train_injection=False`: seconds, no LM stage).
All variants share the collected cache and one cache of lower-layer states (the sequences are the same). Each stage
resumes: a finished adapter or report is kept. The summary (`variants.json`, `variants.md`) has each variant's
AUROC with its interval and its paired difference against every baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from peft_doubter.data.collection import load_cache
from peft_doubter.evaluation.protocol import EvalConfig
from peft_doubter.evaluation.report import EvaluationReport
from peft_doubter.names import (
    ADAPTER_DIR,
    CACHE_DIR,
    CACHE_MANIFEST,
    EVAL_DIR,
    PREFIX_STATES_DIR,
    REPORT_JSON,
    RUN_MANIFEST,
)
from peft_doubter.runs.manifest import read_manifest, write_manifest
from peft_doubter.runs.stages import eval_run, train_run


LM_ONLY = {"confidence_loss_weight": 0.0, "ranking_loss_weight": 0.0, "metric_for_best_model": "loss",
           "greater_is_better": False}
VARIANTS = {  # name -> (reads, Doubter settings, training settings)
    "prompt-selective-ratio-lm": ("prompt", {"encoder_type": "selective", "confidence": "ratio"}, LM_ONLY),
    "answer-selective-ratio-lm": ("answer", {"encoder_type": "selective", "confidence": "ratio"}, LM_ONLY),
    "answer-selective-decision-lm": ("answer", {"encoder_type": "selective", "confidence": "decision"},
                                     {"confidence_loss_weight": 0.0, "ranking_loss_weight": 0.0}),
    "answer-selective-decision-bce": ("answer", {"encoder_type": "selective", "confidence": "decision"}, {}),
    "answer-attentive-decision-bce": ("answer", {"encoder_type": "attentive", "confidence": "decision"}, {}),
    "prompt-selective-decision-bce": ("prompt", {"encoder_type": "selective", "confidence": "decision"}, {}),
    "answer-attentive-head-bce": ("answer", {"encoder_type": "attentive", "confidence": "head"},
                                  {"fit_confidence_head": False}),
    "prompt-selective-head-bce": ("prompt", {"encoder_type": "selective", "confidence": "head"},
                                  {"fit_confidence_head": False}),
    "answer-attentive-head-fit": ("answer", {"encoder_type": "attentive", "confidence": "head"},
                                  {"fit_confidence_head": True, "train_injection": True}),
    "answer-attentive-head-only": ("answer", {"encoder_type": "attentive", "confidence": "head"},
                                   {"fit_confidence_head": True, "train_injection": False}),
}


def variant_run(source: Path, target: Path, reads: str, shared_states: Path) -> None:
    """A run directory over `source`'s questions that reads at `reads`: the same cache (or, for the prompt, the
    cache with the prompt-end states as the features) and the shared lower-layer states."""
    if (target / RUN_MANIFEST).exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(source)
    cache = source / manifest["cache"]
    if reads == manifest["doubter"]["read_position"]:
        (target / CACHE_DIR).symlink_to(cache.resolve())
    else:  # reading the prompt: the features are the states at the prompt's last token, cached beside them
        rows = load_cache(cache)
        rows = rows.remove_columns("features").add_column("features", rows["prompt_features"],
                                                          feature=rows.features["prompt_features"])
        rows.save_to_disk(str(target / CACHE_DIR / "shard-00000"))
        identity = json.loads((cache / CACHE_MANIFEST).read_text())
        identity["identity"]["read_position"] = reads
        (target / CACHE_DIR / CACHE_MANIFEST).write_text(json.dumps(identity, indent=2))
    manifest["doubter"]["read_position"] = reads
    if reads == "prompt" and manifest["doubter"]["encoder_type"] == "attentive":
        manifest["doubter"]["encoder_type"] = "selective"
    manifest["cache"] = CACHE_DIR
    manifest.pop("adapter", None), manifest.pop("train", None), manifest.pop("evaluations", None)
    write_manifest(target, manifest)
    shared_states.mkdir(parents=True, exist_ok=True)
    (target / PREFIX_STATES_DIR).symlink_to(shared_states.resolve())


def run_variant(source: Path, out: Path, name: str, seed: int, epochs: float) -> Path:
    reads, doubter, training = VARIANTS[name]
    run_dir = out / f"{name}-seed{seed}"
    variant_run(source, run_dir, reads, out / PREFIX_STATES_DIR)
    if not (run_dir / ADAPTER_DIR).exists():
        schedule = {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": 0.5 / epochs,
                    "save_steps": 0.5 / epochs}  # validation AUROC twice per epoch
        train_run(run_dir, {"num_train_epochs": epochs, "seed": seed, "save_total_limit": 1, **schedule, **training},
                  doubter)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if not (run_dir / EVAL_DIR / REPORT_JSON).exists():
        eval_run(run_dir, EvalConfig(text_behaviour="none"))
    return run_dir


def summary(out: Path, runs: dict[str, Path]) -> dict:
    table = {}
    for name, run_dir in runs.items():
        report = EvaluationReport.from_json(run_dir / EVAL_DIR / REPORT_JSON)
        doubter = report.methods["doubter"]
        table[name] = {
            "auroc": doubter["auroc"], "auroc_ci": [doubter["auroc_ci_low"], doubter["auroc_ci_high"]],
            "sel_acc@20": doubter["sel_acc@20"], "base_accuracy": doubter["accuracy"], "n_test": doubter["n"],
            "train": read_manifest(run_dir)["train"]["metrics"],
            "paired": report.meta["paired_auroc_vs_baselines"],
            "baselines": {b: m["auroc"] for b, m in report.methods.items() if b != "doubter"},
        }
    (out / "variants.json").write_text(json.dumps(table, indent=2))
    lines = ["| Variant | AUROC [95% CI] | Sel. acc. @20% | vs strongest baseline (paired) |", "|---|---|---|---|"]
    for name, row in table.items():
        best = max(row["baselines"], key=lambda b: row["baselines"][b] if b != "random" else -1)
        diff = row["paired"][best]
        lines.append(f"| {name} | {row['auroc']:.3f} [{row['auroc_ci'][0]:.3f}, {row['auroc_ci'][1]:.3f}] | "
                     f"{row['sel_acc@20']:.3f} | {best} ({row['baselines'][best]:.3f}): {diff['diff']:+.3f} "
                     f"[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, required=True, help="A collected run (answer reading).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for the variant runs and the summary.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {list(VARIANTS)}.")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds.")
    parser.add_argument("--epochs", type=float, default=2.0, help="Most epochs (early stopping on validation).")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        sys.exit(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
    os.makedirs(args.out, exist_ok=True)
    runs = {}
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs[f"{name}-seed{seed}"] = run_variant(args.from_run, args.out, name, seed, args.epochs)
            summary(args.out, runs)
    print((args.out / "variants.md").read_text())


if __name__ == "__main__":
    main()
