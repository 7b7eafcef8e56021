"""End-to-end agreement of the llama.cpp Doubter with PyTorch on held-out questions of a trained run.

    python benchmarks/bench_llama_cpp_parity.py --run-dir runs/quickstart --questions 200

Exports the run's sidecar, then answers the same held-out prompts greedily with PyTorch (the base loaded from the
same Q4_K_M GGUF, de-quantized) and with `llama-doubter` on the GGUF itself. Reports how often the answer/decline
decision agrees and how often the first generated token agrees, with Wilson intervals. Targets: decisions >= 95%,
first tokens >= 90%. Also times the two-pass tool against `--no-doubter` on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peft_doubter.data.collection import load_cache, stop_token_ids
from peft_doubter.data.prompts import first_line
from peft_doubter.data.scoring import is_refusal
from peft_doubter.deploy.llama_cpp import ensure_llama_cpp_build, run_tool
from peft_doubter.evaluation.metrics import wilson_interval
from peft_doubter.runs.stages import export_run, load_run_model
from peft_doubter.tuner.base_models import embedded_gguf_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    build = ensure_llama_cpp_build(build=True)
    model, tokenizer, manifest = load_run_model(args.run_dir)
    if manifest["collect"]["model"] != "gemma-3-270m":
        raise SystemExit("This comparison needs a run on the embedded gemma-3-270m (its GGUF is what llama.cpp runs).")
    gguf = embedded_gguf_path("gemma-3-270m")
    sidecar = export_run(args.run_dir)
    refusal = model.peft_config[model.active_adapter].refusal_text
    cache = load_cache(args.run_dir / manifest["cache"])
    test = [cache[i] for i, split in enumerate(cache["split"]) if split == "test"][: args.questions]

    decisions = first_tokens = 0
    timings: dict[str, list[float]] = {"doubter_prompt_ms": [], "doubter_tok_s": [], "plain_prompt_ms": [],
                                       "plain_tok_s": []}
    disagreements = []
    for row in tqdm(test, desc="PyTorch vs llama.cpp", unit="q"):
        inputs = tokenizer(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        torch_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        torch_text = first_line(tokenizer.decode(torch_tokens, skip_special_tokens=True))
        llama = run_tool(gguf, row["prompt"], sidecar=sidecar, n_predict=args.max_new_tokens, threads=args.threads,
                         build_dir=build)
        llama_text = first_line(llama["text"])
        same_decision = is_refusal(torch_text, refusal) == is_refusal(llama_text, refusal)
        decisions += same_decision
        first_tokens += bool(llama["tokens"]) and llama["tokens"][0] == torch_tokens[0]
        if not same_decision:
            disagreements.append({"question": row["question"], "torch": torch_text, "llama.cpp": llama_text})
        plain = run_tool(gguf, row["prompt"], sidecar=None, n_predict=args.max_new_tokens, threads=args.threads,
                         build_dir=build, ignore_eos=True)
        timed = run_tool(gguf, row["prompt"], sidecar=sidecar, n_predict=args.max_new_tokens, threads=args.threads,
                         build_dir=build, ignore_eos=True)
        timings["doubter_prompt_ms"].append(timed["timing"]["prompt_ms"])
        timings["doubter_tok_s"].append(timed["timing"]["decode_tok_s"])
        timings["plain_prompt_ms"].append(plain["timing"]["prompt_ms"])
        timings["plain_tok_s"].append(plain["timing"]["decode_tok_s"])
    n = len(test)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    result = {
        "run_dir": str(args.run_dir), "questions": n,
        "decision_agreement": decisions / n, "decision_ci": wilson_interval(decisions, n),
        "first_token_agreement": first_tokens / n, "first_token_ci": wilson_interval(first_tokens, n),
        "median_timings": medians,
        "decode_ratio": medians["doubter_tok_s"] / medians["plain_tok_s"],
        "prompt_time_ratio": medians["doubter_prompt_ms"] / medians["plain_prompt_ms"],
        "disagreements": disagreements[:10],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
