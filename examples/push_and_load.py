"""Share a finished Doubter run on the Hub and load it back: the adapter with PEFT, the sidecar for llama.cpp.

    python examples/push_and_load.py runs/gemma-mmlu user/meta-gemma-270m

The run directory must have been trained, exported and evaluated (`peft-doubter train/export/eval --run-dir ...`).
Pushing needs a token with write access (`hf auth login`, or `HF_TOKEN`). `HF_ENDPOINT` points the client at another
Hub-compatible server instead of huggingface.co; it must be set before the script starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from peft_doubter.hub import download_sidecar, load_doubter, push_run
from peft_doubter.tuner.base_models import load_base_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("repo_id", help="e.g. user/meta-gemma-270m")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--license", help="Hub licence id of the base, for bases other than the embedded models")
    parser.add_argument("--prompt", default="Q: What is the capital of France?\nA:")
    args = parser.parse_args(argv)

    commit = push_run(args.run_dir, args.repo_id, private=args.private, license=args.license)
    print(f"Pushed {args.run_dir} in one commit: {commit}")

    base_name = json.loads((args.run_dir / "run.json").read_text())["collect"]["model"]
    base, tokenizer = load_base_model(base_name)  # the exact base the Doubter was trained on
    model = load_doubter(base, args.repo_id)  # checks the repo holds a Doubter, then PeftModel.from_pretrained
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    print("Doubter:", tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print("Sidecar for `llama-doubter --sidecar`:", download_sidecar(args.repo_id))


if __name__ == "__main__":
    main()
