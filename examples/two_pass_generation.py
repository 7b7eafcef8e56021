"""Two-pass generation on a real model: Gemma-3-270M (from its PyPI package) with an untrained Doubter.

    python examples/two_pass_generation.py

An untrained Doubter starts as the identity (its up-projection is zero, like LoRA's B), so its answers match the base
model's; training (see the README) teaches it when to decline. This shows the mechanics: both passes run.
"""

import torch
from peft import get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.tuner.base_models import load_base_model


torch.manual_seed(0)
base, tokenizer = load_base_model("gemma-3-270m")
# The original two-pass Doubter: read the prompt, inject in the upper third (12..17). (The default Doubter reads the
# base's own answer and is used thresholded, without pass 2: see the README.)
model = get_peft_model(base, DoubterConfig(target_layers="late", read_position="prompt", confidence="decision"))
model.print_trainable_parameters()

questions = ["What is the capital of France?", "Who wrote the 1953 novel 'A Kid for Two Farthings'?"]
prompts = [f"Q: {q}\nA:" for q in questions]
tokenizer.padding_side = "left"
inputs = tokenizer(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    doubter = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    with model.disable_adapter():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
width = inputs["input_ids"].shape[1]
for question, with_doubter, without in zip(questions, doubter, plain):
    print(f"Q: {question}")
    print(f"  base model:              {tokenizer.decode(without[width:], skip_special_tokens=True).strip()!r}")
    print(f"  base + untrained Doubter: {tokenizer.decode(with_doubter[width:], skip_special_tokens=True).strip()!r}")
