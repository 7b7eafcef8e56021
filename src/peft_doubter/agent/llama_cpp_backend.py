"""The agent's model on llama.cpp: `llama-doubter --jsonl` drafts each answer and computes the Doubter's decision
(or head) confidence with it, with no PyTorch compute. Prompts are built exactly as PyTorch builds them (the run's
prompt format and exemplars, through the base's tokenizer), so the thresholds a run certified apply; on a quantized
GGUF the confidence differs from PyTorch's by the quantization's effect on the logits."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from ..data.collection import CollectConfig
from ..data.prompts import PromptConfig, build_prompt, first_line
from ..deploy.llama_cpp import LlamaDoubterProcess
from ..names import TOOL_CONFIDENCES


class LlamaCppBackend:
    """A run's Doubter on llama.cpp. Rows carry `doubter_confidence`, the confidence the tool computed with the draft
    (the decision's at the end of the prompt, or the head's from pass 1 alone; `ToolConfidenceScorer` reads it); the
    tool gives no token log-probabilities and cannot score an answer other than the base's own draft."""

    name = "llama.cpp"
    token_logprobs = False

    def __init__(self, process: LlamaDoubterProcess, tokenizer, manifest: dict[str, Any],
                 max_new_tokens: Optional[int] = None) -> None:
        if process.info.get("confidence_kind") not in TOOL_CONFIDENCES:
            raise ValueError(f"The sidecar's Doubter has the {process.info.get('confidence_kind')!r} confidence; "
                             f"llama.cpp computes only the {TOOL_CONFIDENCES} confidences (train with one of them).")
        self.process, self.tokenizer = process, tokenizer
        self.prompt_config = PromptConfig(**manifest["prompt"])
        collect = CollectConfig(**manifest["collect"])
        self.collect_config = dataclasses.replace(collect, max_new_tokens=max_new_tokens or collect.max_new_tokens)
        self.refusal = process.info["refusal_text"]
        self.chat = self.prompt_config.style == "chat"

    def _prompt(self, example: dict, exemplars: Sequence[dict]) -> tuple[str, bool]:
        """The prompt text as PyTorch sees it, without a leading BOS (llama.cpp adds its own), and whether it was
        truncated."""
        prompt = build_prompt(example, self.tokenizer, self.prompt_config, exemplars)
        bos = self.tokenizer.bos_token or ""
        text = prompt.text[len(bos):] if bos and prompt.text.startswith(bos) else prompt.text
        return text, prompt.truncated

    def drafts(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[dict]:
        rows = []
        for example in examples:
            text, truncated = self._prompt(example, exemplars)
            reply = self.process.generate(text, n_predict=self.collect_config.max_new_tokens, stop=["\n"],
                                          threshold=0.0)
            rows.append({**example, "prompt": text, "prompt_truncated": truncated,
                         "pass1_answer": first_line(reply["draft"]), "doubter_confidence": reply["confidence"],
                         "answer_ids": list(reply["draft_tokens"]), "token_logprobs": []})
        return rows

    def write(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[str]:
        """What pass 2 writes (greedy, the Doubter injected), first line of each."""
        return [first_line(self.process.generate(self._prompt(example, exemplars)[0],
                                                 n_predict=self.collect_config.max_new_tokens, stop=["\n"])["text"])
                for example in examples]

    def read_answer(self, question: str, answer: str, exemplars: Sequence[dict]) -> dict:
        raise ValueError("Scoring a given answer needs the PyTorch back-end: llama.cpp computes the decision "
                         "confidence for the base's own draft only.")

    @contextlib.contextmanager
    def injection_gain(self, gain: float) -> Iterator[None]:
        if gain != 1.0:
            raise ValueError("The llama.cpp back-end injects at gain 1 only (a request-time gain needs the PyTorch "
                             "back-end).")
        yield


class ToolConfidenceScorer:
    """The Doubter's confidence (decision or head) as llama.cpp computed it with the draft (rows of
    `LlamaCppBackend`)."""

    name = "doubter"

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        return np.array([float(row["doubter_confidence"]) for row in rows])
