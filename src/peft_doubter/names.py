"""Names shared across the package, each defined once: the files of a run directory, the refusal and correction
sentences, and the option lists of the Doubter's settings. Imports nothing, so every module (and the C++ header
generator) can use it."""

from __future__ import annotations


# ------------------------------------------------------------------------------------------- a run directory
RUN_MANIFEST = "run.json"  # what `collect` decided; later stages need only the run directory
RUN_LOCK = ".lock"  # held by the process working on the run directory
DATASET_SEPARATOR = ","  # `--dataset triviaqa,nq_open`: one collection over several sources
CACHE_DIR = "cache"  # the activation cache (resumable shards)
CACHE_MANIFEST = "manifest.json"  # inside CACHE_DIR: what the cache was built from
PREFIX_STATES_DIR = "prefix_states"  # the states entering the first inject layer, per cached sequence (resumable)
CHECKPOINTS_DIR = "checkpoints"  # trainer checkpoints (resumable)
ADAPTER_DIR = "adapter"  # the trained adapter
EVAL_DIR = "eval"  # the default evaluation folder
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
RISK_COVERAGE_PLOT = "risk_coverage.png"
SIDECAR_FILE = "doubter_sidecar.gguf"  # the GGUF sidecar for llama.cpp
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names for a saved adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# --------------------------------------------------------------------------------------- what the Doubter says
DEFAULT_REFUSAL = "I'm not confident enough to answer this question accurately."
CORRECTION_PREFIX = "Wait, the correct answer is"

# ----------------------------------------------------------------------------------------------- option lists
ENCODER_TYPES = ("selective", "multi_token", "transformer", "attentive")
POOLINGS = ("last", "mean", "last_mean")
READ_POSITIONS = ("prompt", "answer")
CONFIDENCES = ("decision", "ratio", "head")
SIDECAR_CONFIDENCES = ("decision", "ratio", "head")  # those a llama.cpp sidecar holds
TOOL_CONFIDENCES = ("decision", "head")  # those llama.cpp computes (and thresholds)
LAYER_SPEC_WORDS = ("all", "late")
# what pass 1 records per token of the base's own answer (read_position='answer'), in this column order
TOP_K_SIGNALS = 4  # top-k log-probabilities kept per answer token
TOKEN_SIGNALS = ("logprob", "entropy", *(f"top{k + 1}" for k in range(TOP_K_SIGNALS)))
SIGNAL_LIMIT = 50.0  # the encoder clips token signals (log-probabilities and entropies) to +-50 nats

# --------------------------------------------------------------------------------------------------- the agent
AGENT_ACTIONS = ("answer", "lookup_answer", "decline")
AGENT_MODES = ("confidence", "text")  # gate on a scorer's confidence, or on whether pass 2 wrote the refusal
AGENT_SCORERS = ("doubter", "min_token", "probe", "random")
SERVE_BACKENDS = ("pytorch", "llama.cpp")
# what an evaluation reports as the text written: greedy two-pass generation, the thresholded answer (the base's
# own answer at or above the calibrated threshold, else the refusal: what `ask --threshold calibrated` and the
# server write), or nothing
TEXT_BEHAVIOURS = ("two-pass", "thresholded", "none")
CORPORA = ("sciq-support", "boolq", "sciq-support+boolq")  # lookup corpora that install with the benchmark data
