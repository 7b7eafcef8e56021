"""Time to a thresholded reply on llama.cpp: the plain model's greedy answer vs a Doubter that decides on it.

    python benchmarks/bench_llama_cpp_reply.py --json results/bench_llama_cpp_reply.json [--questions 40] [--threads 2]

The Doubter answers with the base's own draft or declines (`--threshold`). With the `decision` confidence the tool
runs pass 1 with the draft, the encoder, and pass 2 over the prompt (the confidence is read at its end); with the
`head` confidence it decides right after the encoder and runs no pass 2. Each question is asked of four
`llama-doubter --jsonl` processes in turn (plain; decision and head sidecars with the default Doubter settings; the
answer-reading head, i.e. TriviaQA's best Doubter: late layers read at every token of the draft by the attentive
encoder, which also costs each draft token's signals over the vocabulary) on Gemma-3-270M with random weights (timing
does not depend on the weights) on the Q4_K_M GGUF; the time is the wall clock of the request and the tool's own
breakdown. Reported: medians and the ratios to plain from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.data.benchmarks import load_benchmark
from peft_doubter.deploy.llama_cpp import LlamaDoubterProcess
from peft_doubter.deploy.sidecar import doubter_tensors, write_sidecar
from peft_doubter.tuner.base_models import embedded_gguf_path, load_base_model


SIDECARS = {  # arm -> Doubter settings
    "decision": {"confidence": "decision", "read_position": "prompt"},
    "head": {"confidence": "head", "read_position": "prompt"},
    "answer_head": {"confidence": "head", "target_layers": "late", "encoder_type": "attentive",
                    "read_position": "answer"},
}


def random_sidecar(path: Path, settings: dict) -> Path:
    """A Doubter on Gemma-3-270M with random weights, exported."""
    base, _ = load_base_model("gemma-3-270m")
    torch.manual_seed(0)
    model = get_peft_model(base, DoubterConfig(**settings))
    return write_sidecar(path, *doubter_tensors(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    questions = [row["question"] for row in load_benchmark("triviaqa", limit=args.questions)]
    gguf = embedded_gguf_path("gemma-3-270m")
    timings: dict[str, list[dict]] = {"plain": [], **{kind: [] for kind in SIDECARS}}
    with tempfile.TemporaryDirectory() as tmp:
        sidecars = {kind: random_sidecar(Path(tmp) / f"{kind}.gguf", settings) for kind, settings in SIDECARS.items()}
        processes = {"plain": LlamaDoubterProcess(gguf, threads=args.threads),
                     **{kind: LlamaDoubterProcess(gguf, path, threads=args.threads) for kind, path in sidecars.items()}}
        try:
            for question in questions:
                prompt = f"Q: {question}\nA:"
                for kind, process in processes.items():
                    start = time.perf_counter()
                    reply = process.generate(prompt, n_predict=args.max_new_tokens, stop=["\n"],
                                             threshold=None if kind == "plain" else 0.5)
                    timings[kind].append({"wall_ms": 1000 * (time.perf_counter() - start), **reply["timing"],
                                          "text": reply["text"], "draft": reply.get("draft")})
        finally:
            for process in processes.values():
                process.close()
    drafts_match = {kind: all(d["draft"] == p["text"] for d, p in zip(timings[kind], timings["plain"]))
                    for kind in SIDECARS}
    summary = {kind: {key: statistics.median(t[key] for t in rows)
                      for key in ("wall_ms", "pass1_ms", "draft_ms", "encode_ms", "pass2_prompt_ms", "decode_ms")}
               for kind, rows in timings.items()}
    ratios = {kind: summary[kind]["wall_ms"] / summary["plain"]["wall_ms"] for kind in SIDECARS}
    results = {"questions": len(questions), "threads": args.threads, "max_new_tokens": args.max_new_tokens,
               "gguf": str(gguf), "median": summary, "reply_time_vs_plain": ratios,
               "drafts_equal_plain_text": drafts_match, "per_question": timings}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    for kind, row in summary.items():
        print(f"{kind:11s} median reply {row['wall_ms']:.1f} ms " + " ".join(f"{k}={v:.1f}" for k, v in row.items()
                                                                         if k != "wall_ms"))
    print("reply time vs plain: " + ", ".join(f"{kind} {ratio:.2f}x" for kind, ratio in ratios.items())
          + f"; drafts = plain text: {drafts_match}")


if __name__ == "__main__":
    main()
