#!/usr/bin/env bash
# The agent on SciQ asked as open QA, with the BM25 lookup over SciQ's support paragraphs, on Gemma-3-270M (PyPI):
# the original two-pass Doubter trained on the run's own train split (prompt reading, selective encoder, decision
# confidence), `agent eval` comparing every gate and policy on the same cached drafts, then the same run exported
# and served on both back-ends (server overhead and a load test). Every stage resumes.
#   RUNS=~/.cache/peft-doubter/runs bash benchmarks/agent_sciq_open.sh
set -euo pipefail
RUNS=${RUNS:-runs}
RUN="$RUNS/sciq-open-agent"
mkdir -p "$RUNS"
peft-doubter collect --run-dir "$RUN" --dataset sciq_open --limit none --k-shot 2 --target-layers late \
  --val-fraction 0.2 --test-fraction 0.3 --read-position prompt --encoder-type selective --confidence decision
peft-doubter train --run-dir "$RUN" --num-train-epochs 2
peft-doubter eval --run-dir "$RUN" --text-behaviour two-pass
peft-doubter agent eval --run-dir "$RUN" --corpus sciq-support --verify 20
peft-doubter export --run-dir "$RUN"
python "$(dirname "$0")/bench_serving.py" --run-dir "$RUN" --backend pytorch --json "$RUN/bench_serving_pytorch.json"
python "$(dirname "$0")/bench_serving.py" --run-dir "$RUN" --backend llama.cpp --json "$RUN/bench_serving_llama_cpp.json"
