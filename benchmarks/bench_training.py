"""Training step cost on Gemma-3-270M: (a) naive two-pass with full-vocabulary logits against (b) cached pass-1
activations with LM-head logits only in the target columns (what `DoubterTrainer.compute_loss` does), in one run.

    python benchmarks/bench_training.py --steps 6 --batch-size 8

Both arms train the same Doubter (late layers) on the same tokenized rows (few-shot TriviaQA prompts with a
confirm or refuse target). Reports samples/s and peak memory (resident-set growth on CPU, CUDA peak on a GPU) and
the ratios. Each arm runs in its own process, so one arm's peak memory does not hide the other's.
Targets: (b) >= 2x faster, <= 0.5x memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.data.benchmarks import load_benchmark
from peft_doubter.data.prompts import PromptConfig, build_prompt
from peft_doubter.data.sequences import tokenize_example
from peft_doubter.training.trainer import DoubterCollator, target_loss
from peft_doubter.tuner.base_models import load_base_model
from peft_doubter.tuner.capture import prompt_end_from_labels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_arm(model, batches, cached: bool) -> tuple[float, float]:
    """(samples per second, peak memory in MB above the start) for a few optimizer steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start_rss, samples, start = peak_rss_mb(), 0, 0.0
    for step, batch in enumerate(batches):
        if step == 1:  # the first step warms up allocators and kernels
            start, samples = time.perf_counter(), 0
        if cached:
            loss, _ = target_loss(model, batch)
        else:
            loss = model(**{k: v for k, v in batch.items() if k != "pass1_features"}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        samples += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb() - start_rss
    return samples / elapsed, memory


def measure(args: argparse.Namespace) -> dict:
    """One arm in this process."""
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base_model("gemma-3-270m")
    model = get_peft_model(base, DoubterConfig(target_layers="late"))
    questions = load_benchmark("triviaqa").select(range(args.k_shot + args.batch_size * (args.steps + 1)))
    exemplars, rows = list(questions.select(range(args.k_shot))), []
    for i, example in enumerate(questions.select(range(args.k_shot, len(questions)))):
        prompt = build_prompt(example, tokenizer, PromptConfig(k_shot=args.k_shot), exemplars).text
        target = example["answers"][0] if i % 3 == 0 else model.peft_config["default"].refusal_text
        rows.append(tokenize_example(tokenizer, prompt, target, chat=False))
    collate = DoubterCollator(tokenizer.pad_token_id)
    batches = []
    for start in range(0, len(rows), args.batch_size):
        batch = collate(rows[start:start + args.batch_size])
        if args.arm == "cached":  # what the activation cache holds
            positions = prompt_end_from_labels(batch["labels"])
            batch["pass1_features"] = model.base_model.run_pass1(
                batch["input_ids"], batch["attention_mask"], positions, keep_prefix=False).stacked()
        batches.append(batch)
    speed, memory = run_arm(model, batches, cached=args.arm == "cached")
    tokens = float(sum(len(r["input_ids"]) for r in rows) / len(rows))
    return {"arm": args.arm, "samples_per_s": speed, "peak_mb": memory, "mean_tokens_per_row": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k-shot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", choices=["naive", "cached"], help="run one arm (used internally)")
    args = parser.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(measure(args)))
        return
    arms = {}
    for arm in ("naive", "cached"):
        command = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--k-shot", str(args.k_shot), "--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        arms[arm] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    naive, cached = arms["naive"], arms["cached"]
    result = {
        "model": "gemma-3-270m", "layers": "late (12..17)", "batch_size": args.batch_size, "steps": args.steps,
        "k_shot": args.k_shot, "mean_tokens_per_row": naive["mean_tokens_per_row"],
        "naive_samples_per_s": naive["samples_per_s"], "cached_samples_per_s": cached["samples_per_s"],
        "naive_peak_mb": naive["peak_mb"], "cached_peak_mb": cached["peak_mb"],
        "speedup": cached["samples_per_s"] / naive["samples_per_s"],
        "memory_ratio": cached["peak_mb"] / naive["peak_mb"],
    }
    print(json.dumps(result, indent=2))
    print(f"cached/naive speed {result['speedup']:.2f}x (target >= 2), memory {result['memory_ratio']:.2f}x "
          f"(target <= 0.5)")


if __name__ == "__main__":
    main()
