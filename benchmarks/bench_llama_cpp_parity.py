"""Agreement of the llama.cpp Doubter with PyTorch on the held-out questions of a trained run, and its speed.

    python benchmarks/bench_llama_cpp_parity.py --run-dir RUNS/sciq-open-agent [--gguf base.gguf] [--json out.json]

The run must use the embedded gemma-3-270m with a confidence llama.cpp computes (decision, or head: prompt or answer
reading). Exports the run's sidecar, then scores every test prompt with `llama-doubter --jsonl` on a GGUF of the base
(default: the embedded Q4_K_M; `--gguf` takes e.g. an F32 conversion) and compares its confidence with the one
`peft-doubter eval` stored for the same question (PyTorch, float32 model; an answer reading's token states stored
in float16 by collection): absolute differences, and how often answer/decline agrees at thresholds set at the
deciles of PyTorch's confidences (and at the calibrated threshold when one was certified), with Wilson intervals.
Also how often the base's greedy draft is the same text in both. For a decision run it then times the two-pass tool
against `--no-doubter` on `--timing-questions` prompts: time to first token and decode speed (medians, one process
per prompt, as a user runs it); a head Doubter's reply time is `bench_llama_cpp_reply.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from peft_doubter.data.collection import load_cache
from peft_doubter.data.prompts import first_line
from peft_doubter.deploy.llama_cpp import LlamaDoubterProcess, ensure_llama_cpp_build, run_tool
from peft_doubter.evaluation.statistics import wilson_interval
from peft_doubter.names import EVAL_DIR, REPORT_JSON, TOOL_CONFIDENCES
from peft_doubter.runs.manifest import read_manifest
from peft_doubter.runs.stages import export_run
from peft_doubter.tuner.base_models import embedded_gguf_path


def agreement(torch_conf: np.ndarray, llama_conf: np.ndarray, threshold: float) -> dict:
    same = int(((torch_conf >= threshold) == (llama_conf >= threshold)).sum())
    return {"threshold": threshold, "answered_torch": int((torch_conf >= threshold).sum()), "agree": same,
            "agreement": same / len(torch_conf), "agreement_ci": wilson_interval(same, len(torch_conf))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, help="the base as GGUF (default: the embedded Q4_K_M)")
    parser.add_argument("--questions", type=int, help="only the first N test questions")
    parser.add_argument("--timing-questions", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    manifest = read_manifest(args.run_dir)
    confidence = manifest["doubter"].get("confidence")
    if manifest["collect"]["model"] != "gemma-3-270m" or confidence not in TOOL_CONFIDENCES:
        raise SystemExit(f"This comparison needs a run on the embedded gemma-3-270m with a confidence in "
                         f"{TOOL_CONFIDENCES}.")
    if confidence == "head":
        args.timing_questions = 0
    report = json.loads((args.run_dir / EVAL_DIR / REPORT_JSON).read_text())
    cache = load_cache(args.run_dir / manifest["cache"])
    test = [i for i, split in enumerate(cache["split"]) if split == report["meta"]["split"]]
    if [bool(cache[i]["correct"]) for i in test] != [bool(c) for c in report["correct"]]:
        raise SystemExit("The report's questions are not the cache's test rows in order.")
    test = test[: args.questions]
    torch_conf = np.asarray(report["scores"]["doubter"]["confidence"], dtype=float)[: len(test)]
    build = ensure_llama_cpp_build(build=True)
    gguf = args.gguf or embedded_gguf_path("gemma-3-270m")
    sidecar = export_run(args.run_dir)

    rows = []
    with LlamaDoubterProcess(gguf, sidecar, threads=args.threads, build_dir=build) as tool:
        for index, pytorch_confidence in zip(tqdm(test, desc="llama.cpp confidence", unit="q"), torch_conf):
            row = cache[index]
            reply = tool.generate(row["prompt"], n_predict=args.max_new_tokens, threshold=0.5, stop=["\n"])
            rows.append({"id": row["id"], "llama_cpp_draft": first_line(reply["draft"].strip()),
                         "pytorch_draft": row["pass1_answer"], "llama_cpp_confidence": reply["confidence"],
                         "pytorch_confidence": float(pytorch_confidence)})
    llama_conf = np.array([row["llama_cpp_confidence"] for row in rows], dtype=float)
    same_draft = sum(row["llama_cpp_draft"] == row["pytorch_draft"].strip() for row in rows)
    difference = np.abs(llama_conf - torch_conf)
    thresholds = [float(t) for t in np.quantile(torch_conf, np.linspace(0.1, 0.9, 9))]
    calibrated = report["meta"]["calibrated"]["threshold"]
    n = len(test)

    timings: dict[str, list[float]] = {"doubter_prompt_ms": [], "doubter_tok_s": [], "plain_prompt_ms": [],
                                       "plain_tok_s": []}
    for index in tqdm(test[: args.timing_questions], desc="timing", unit="q"):
        prompt = cache[index]["prompt"]
        for mode, side in (("plain", None), ("doubter", sidecar)):
            timed = run_tool(gguf, prompt, sidecar=side, n_predict=args.max_new_tokens, threads=args.threads,
                             build_dir=build, ignore_eos=True)
            timings[f"{mode}_prompt_ms"].append(timed["timing"]["prompt_ms"])
            timings[f"{mode}_tok_s"].append(timed["timing"]["decode_tok_s"])
    medians = {name: statistics.median(values) for name, values in timings.items()} if args.timing_questions else {}

    result = {
        "run_dir": str(args.run_dir), "gguf": str(gguf), "questions": n, "confidence": confidence,
        "confidence_abs_diff": {"median": float(np.median(difference)), "p95": float(np.quantile(difference, 0.95)),
                                "max": float(difference.max()), "within_1e-3": float((difference <= 1e-3).mean())},
        "decision_agreement_at_deciles": [agreement(torch_conf, llama_conf, t) for t in thresholds],
        "decision_agreement_at_calibrated": (agreement(torch_conf, llama_conf, calibrated)
                                             if calibrated is not None and math.isfinite(calibrated) else None),
        "calibrated_threshold": calibrated,
        "same_draft": same_draft / n, "same_draft_ci": wilson_interval(same_draft, n),
        "timing_questions": min(args.timing_questions, n), "median_timings": medians,
        "time_to_first_token_ratio": (medians["doubter_prompt_ms"] / medians["plain_prompt_ms"]) if medians else None,
        "decode_ratio": (medians["doubter_tok_s"] / medians["plain_tok_s"]) if medians else None,
        "questions_scored": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "questions_scored"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
