"""Training and scoring cost on Gemma-3-270M, each arm in its own process, ratios from one run.

    python benchmarks/bench_training.py --steps 6 --batch-size 32

Training arms (the same Doubter, late layers, on the same few-shot TriviaQA rows with confirm or refuse targets):
  naive        two passes every step: pass 1 over the prompt, then pass 2 over all layers with full-vocabulary logits
  trainer      `DoubterTrainer` as `peft-doubter train` runs it: cached pass 1, pass 2 from the cached states entering
               the first inject layer, LM-head logits only in the target columns, the confidence loss, no gradient
               checkpointing
  trainer+gc   the same with gradient checkpointing (what TRL turns on by default): its time and memory cost
Scoring arms (questions/s of the Doubter's confidence on cached questions):
  ratio        P(answer) vs P(refusal), two teacher-forced continuations through the full pass 2 (the first release)
  decision     the refusal's probability at the end of the prompt, pass 2 from the cached lower-layer states
  head         the encoder's linear head on the cached pass-1 reading (`confidence="head"`: no pass 2)
Samples/s exclude the first step (allocators, warm-up); peak memory is the resident-set growth of the arm's process
(CUDA peak on a GPU). Targets (issue 13): trainer >= 6x naive samples/s at <= 0.4x memory; decision >= 3x ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from peft import get_peft_model
from transformers import TrainerCallback

from peft_doubter import DoubterConfig
from peft_doubter.data.benchmarks import load_benchmark
from peft_doubter.data.prefix_states import attach_prefix_states
from peft_doubter.data.prompts import PromptConfig, build_prompt
from peft_doubter.data.sequences import first_target_token, tokenize_example
from peft_doubter.evaluation.confidence import doubter_log_odds
from peft_doubter.training.config import DoubterSFTConfig
from peft_doubter.training.trainer import DoubterCollator, DoubterTrainer
from peft_doubter.tuner.base_models import load_base_model
from peft_doubter.tuner.capture import prompt_end_from_labels


ARMS = ("naive", "trainer", "trainer+gc", "ratio", "decision", "head")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock(TrainerCallback):
    """Wall time of every training step after the first."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter() - self.start)


def rows_for(model, tokenizer, count: int, k_shot: int) -> tuple[list[dict], list[dict]]:
    """Tokenized prompt + target rows with their pass-1 features, and the cached-question form of the same."""
    questions = load_benchmark("triviaqa").select(range(k_shot + count))
    exemplars = list(questions.select(range(k_shot)))
    refusal = model.peft_config["default"].refusal_text
    rows, cached = [], []
    for i, example in enumerate(questions.select(range(k_shot, len(questions)))):
        prompt = build_prompt(example, tokenizer, PromptConfig(k_shot=k_shot), exemplars).text
        right = i % 7 == 0  # about the base's accuracy
        row = tokenize_example(tokenizer, prompt, example["answers"][0] if right else refusal, chat=False)
        ids = torch.tensor([row["input_ids"]])
        position = prompt_end_from_labels(torch.tensor([row["labels"]]))
        features = model.base_model.run_pass1(ids, torch.ones_like(ids), position, keep_prefix=False).stacked()[0]
        rows.append({**row, "pass1_features": features.numpy(), "correct": right,
                     "refusal_token": first_target_token(tokenizer, prompt, refusal, chat=False)})
        cached.append({"prompt": prompt, "features": features.numpy(), "pass1_answer": example["answers"][0],
                       "choices": []})
    return rows, cached


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base_model("gemma-3-270m")
    confidence = args.arm if args.arm in ("ratio", "head") else "decision"
    model = get_peft_model(base, DoubterConfig(target_layers="late", read_position="prompt", confidence=confidence))
    count = args.batch_size * (args.steps + 1)
    rows, cached = rows_for(model, tokenizer, count, args.k_shot)
    gc.collect()
    start_rss = peak_rss_mb()
    if args.arm in ("ratio", "decision", "head"):
        if args.arm == "decision":
            with tempfile.TemporaryDirectory() as folder:
                states = attach_prefix_states(model, datasets.Dataset.from_list(rows), Path(folder))
                cached = [{**c, "prefix_hidden": states[i]["prefix_hidden"]} for i, c in enumerate(cached)]
                start_rss = peak_rss_mb()
                return score(model, tokenizer, cached, args, start_rss)
        return score(model, tokenizer, cached, args, start_rss)
    if args.arm == "naive":
        collate = DoubterCollator(tokenizer.pad_token_id, use_cached_features=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times = []
        for start in range(0, len(rows), args.batch_size):
            batch = collate(rows[start:start + args.batch_size])
            began = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                  ).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - began)
    else:
        clock = StepClock()
        with tempfile.TemporaryDirectory() as folder:
            train = attach_prefix_states(model, datasets.Dataset.from_list(rows), Path(folder) / "states")
            start_rss = peak_rss_mb()
            config = DoubterSFTConfig(output_dir=str(Path(folder) / "out"), max_steps=args.steps + 1,
                                      per_device_train_batch_size=args.batch_size, save_strategy="no",
                                      eval_strategy="no", load_best_model_at_end=False, pretrain_projectors=False,
                                      logging_steps=1000, gradient_checkpointing=args.arm == "trainer+gc",
                                      disable_tqdm=True, early_stopping_patience=None)
            trainer = DoubterTrainer(model, config, train_dataset=train, processing_class=tokenizer,
                                     callbacks=[clock])
            trainer.train()
        times = clock.times
    memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb() - start_rss
    return {"arm": args.arm, "samples_per_s": args.batch_size / (sum(times[1:]) / len(times[1:])),
            "peak_mb": memory, "mean_tokens_per_row": sum(len(r["input_ids"]) for r in rows) / len(rows)}


def score(model, tokenizer, cached: list[dict], args: argparse.Namespace, start_rss: float) -> dict:
    model.eval()
    refusal = model.peft_config["default"].refusal_text
    doubter_log_odds(model, tokenizer, cached[: args.batch_size], refusal, "letter", False, 8, progress=False)
    began = time.perf_counter()
    doubter_log_odds(model, tokenizer, cached[args.batch_size:], refusal, "letter", False, 8, progress=False)
    elapsed = time.perf_counter() - began
    return {"arm": args.arm, "questions_per_s": (len(cached) - args.batch_size) / elapsed,
            "peak_mb": peak_rss_mb() - start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k-shot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", choices=ARMS, help="run one arm (used internally)")
    parser.add_argument("--output", type=Path, help="Write the result JSON here too.")
    args = parser.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(measure(args)))
        return
    arms = {}
    for arm in ARMS:
        command = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--k-shot", str(args.k_shot), "--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        arms[arm] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(arms[arm]), flush=True)
    naive, trainer, checkpointed = arms["naive"], arms["trainer"], arms["trainer+gc"]
    result = {
        "model": "gemma-3-270m", "layers": "late (12..17)", "batch_size": args.batch_size, "steps": args.steps,
        "k_shot": args.k_shot, "threads": args.threads, "arms": arms,
        "trainer_speedup": trainer["samples_per_s"] / naive["samples_per_s"],
        "trainer_memory_ratio": trainer["peak_mb"] / naive["peak_mb"],
        "checkpointing_speed_ratio": checkpointed["samples_per_s"] / trainer["samples_per_s"],
        "checkpointing_memory_ratio": checkpointed["peak_mb"] / trainer["peak_mb"],
        "scoring_speedup": arms["decision"]["questions_per_s"] / arms["ratio"]["questions_per_s"],
        "head_scoring_speedup": arms["head"]["questions_per_s"] / arms["ratio"]["questions_per_s"],
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"trainer/naive speed {result['trainer_speedup']:.2f}x (target >= 6), memory "
          f"{result['trainer_memory_ratio']:.2f}x (target <= 0.4); gradient checkpointing costs "
          f"{1 / result['checkpointing_speed_ratio']:.2f}x time for {result['checkpointing_memory_ratio']:.2f}x memory; "
          f"decision/ratio scoring {result['scoring_speedup']:.2f}x (target >= 3), head/ratio "
          f"{result['head_scoring_speedup']:.2f}x")


if __name__ == "__main__":
    main()
