"""The agent loop: the controller, not the small model, decides between answering, looking something up and declining,
from a confidence in the model's own draft.

    draft closed-book -> confidence c0 >= closed threshold ? answer
                      -> else look up (the question as query; a chat model may write it in a native tool call)
                         -> draft with the evidence -> c1 >= open threshold ? answer : decline

Any scorer can gate (the Doubter, the answer's min-token probability, a probe, random), so gates are compared on
the same drafts. Text mode follows the seeds instead: pass 2 writes the refusal -> look up; again -> decline.
Everything is greedy, so a live run reproduces the simulated policy of `AgentComparison` exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import torch
from transformers import StoppingCriteriaList

from ..data.collection import CollectConfig, collect_batch, stop_token_ids
from ..data.prompts import PromptConfig, build_prompt, first_line
from ..data.scoring import ExactMatchJudge, is_refusal
from ..names import AGENT_MODES as MODES
from ..names import DEFAULT_REFUSAL
from .native import TOOL_CALL_STOP, TURN_STOPS, NativeToolPrompt, NativeToolRenderer, TextStop, cut_at_stop
from .scorers import Scorer
from .tools import ToolRegistry


LOOKUP = "lookup"


class InferenceBackend(Protocol):
    """What the agent needs from a model: drafts of cached-question rows and what pass 2 writes."""

    name: str
    refusal: str
    token_logprobs: bool  # whether drafts carry their tokens' log-probabilities

    def drafts(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[dict]: ...

    def write(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[str]: ...

    def read_answer(self, question: str, answer: str, exemplars: Sequence[dict]) -> dict: ...

    def injection_gain(self, gain: float) -> contextlib.AbstractContextManager: ...


class TorchBackend:
    """A run's PyTorch Doubter: drafts and their reading exactly as `peft-doubter collect` caches them."""

    name = "pytorch"
    token_logprobs = True

    def __init__(self, model, tokenizer, manifest: dict[str, Any], max_new_tokens: Optional[int] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompt_config = PromptConfig(**manifest["prompt"])
        collect = CollectConfig(**manifest["collect"])
        self.collect_config = dataclasses.replace(collect, max_new_tokens=max_new_tokens or collect.max_new_tokens)
        self.refusal = model.peft_config[model.active_adapter].refusal_text
        self.chat = self.prompt_config.style == "chat"

    def drafts(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[dict]:
        return collect_batch(self.model, self.tokenizer, list(examples), self.prompt_config, list(exemplars),
                             ExactMatchJudge(), self.collect_config)

    def read_answer(self, question: str, answer: str, exemplars: Sequence[dict]) -> dict:
        """A cached-question row for a given answer (not necessarily the base's): what the scorers need to rate it,
        read as `draft` reads the base's own answer (teacher-forced)."""
        prompt = build_prompt(example_for(question), self.tokenizer, self.prompt_config, exemplars).text
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.chat).to(self.model.device)
        spaced = answer.strip() if prompt[-1:].isspace() else f" {answer.strip()}"
        answer_ids = self.tokenizer(spaced, add_special_tokens=False)["input_ids"]
        doubter = self.model.base_model
        with self.model.disable_adapter():
            reading = doubter.read_given_answers(inputs["input_ids"], inputs["attention_mask"], [answer_ids])
            prompt_reading = doubter.run_pass1(inputs["input_ids"], inputs["attention_mask"], torch.tensor(
                [inputs["input_ids"].shape[1] - 1]), keep_prefix=False).stacked()
        length = len(answer_ids)
        signals = reading.token_signals[0, :length]
        answer_mode = self.model.peft_config[self.model.active_adapter].read_position == "answer"
        return {"id": "score", "question": question, "prompt": prompt, "pass1_answer": answer.strip(),
                "choices": [], "answers": [], "label": -1,
                "features": (reading.features if answer_mode else prompt_reading)[0].cpu().numpy(),
                "answer_states": reading.answer_states[0, :length].cpu().numpy(),
                "token_signals": signals.cpu().numpy(), "answer_ids": answer_ids,
                "token_logprobs": signals[:, 0].tolist() or [0.0]}

    def injection_gain(self, gain: float):
        """A context in which the injection is scaled by `gain` (0: the plain base)."""
        return self.model.base_model.injection_gain(gain)

    def write(self, examples: Sequence[dict], exemplars: Sequence[dict]) -> list[str]:
        """Greedy two-pass generation (the Doubter writes), first line of each."""
        self.tokenizer.padding_side = "left"
        prompts = [build_prompt(e, self.tokenizer, self.prompt_config, exemplars).text for e in examples]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        out = self.model.generate(**inputs.to(self.model.device), max_new_tokens=self.collect_config.max_new_tokens,
                                  do_sample=False, eos_token_id=stop_token_ids(self.tokenizer),
                                  pad_token_id=self.tokenizer.pad_token_id)
        width = inputs["input_ids"].shape[1]
        return [first_line(self.tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]


@dataclass
class Thresholds:
    """Answer closed-book at `closed` or above; after a lookup at `open` or above (inf: never)."""

    closed: float
    open: float = math.inf

    def __post_init__(self) -> None:
        for name in ("closed", "open"):
            value = getattr(self, name)
            if math.isnan(value) or not (0.0 <= value <= 1.0 or value == math.inf):
                raise ValueError(f"The {name} threshold must be a confidence in [0, 1] or inf, got {value!r}.")


@dataclass
class AgentResult:
    """One question's outcome: what was written, the action, the confidence it rested on and the trace."""

    question: str
    text: str
    action: str
    confidence: float
    threshold: float
    scorer: str
    closed_book: dict[str, Any]
    open_book: Optional[dict[str, Any]] = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _part(row: dict) -> dict[str, Any]:
    """What a result keeps of a draft: the answer and confidence, and for usage and log-probabilities the prompt,
    the answer's tokens and their log-probabilities."""
    return {"answer": row["answer"], "confidence": row["confidence"], "prompt": row["prompt"],
            "answer_ids": list(row.get("answer_ids", [])), "token_logprobs": list(row.get("token_logprobs", []))}


def example_for(question: str, evidence: str = "", identifier: str = "agent") -> dict[str, Any]:
    """A question in the cache-row form `collect_batch` takes (no gold answers: live questions are not judged)."""
    return {"id": identifier, "question": question.strip(), "answers": [], "choices": [], "label": -1,
            "subject": "", "split": "live", "evidence": evidence}


class MetaAgent:
    """Answer, look up, or decline, by a scorer's confidence in the model's own draft (or by what pass 2 writes,
    in text mode). `exemplars` are the run's few-shot exemplars; with a lookup tool, their open-book copies carry
    the evidence the tool finds for them, so closed- and open-book prompts differ only by the evidence."""

    def __init__(self, backend: InferenceBackend, scorer: Scorer, thresholds: Thresholds,
                 exemplars: Sequence[dict], registry: Optional[ToolRegistry] = None, mode: str = "confidence",
                 max_lookups: int = 1, tokenizer=None) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        self.backend, self.scorer, self.thresholds, self.mode = backend, scorer, thresholds, mode
        self.registry = registry or ToolRegistry()
        self.max_lookups = max_lookups if LOOKUP in self.registry else 0
        self.exemplars = list(exemplars)
        self.open_exemplars = [
            {**ex, "evidence": self.registry.call(LOOKUP, {"query": ex["question"]}).content} for ex in exemplars
        ] if self.max_lookups else []
        self.native = None
        if tokenizer is not None and tokenizer.chat_template is not None and self.max_lookups:
            self.native = (NativeToolPrompt(tokenizer), NativeToolRenderer(tokenizer), tokenizer)

    def run(self, question: str, history: Sequence[dict] = (), *, scorer: Optional[Scorer] = None,
            thresholds: Optional[Thresholds] = None, lookups: Optional[int] = None) -> AgentResult:
        """One question; `history` (earlier answered turns, as exemplars) precedes it in the prompt. `scorer`,
        `thresholds` and `lookups` (at most the agent's `max_lookups`) override the agent's for this question."""
        if not question.strip():
            raise ValueError("Empty question.")
        scorer, thresholds = scorer or self.scorer, thresholds or self.thresholds
        lookups = self.max_lookups if lookups is None else min(lookups, self.max_lookups)
        start = time.perf_counter()
        closed = self._draft(example_for(question), [*self.exemplars, *history], scorer)
        steps = [{"step": "draft", "answer": closed["answer"], "confidence": closed["confidence"]}]
        result = AgentResult(question, closed["answer"], "answer", closed["confidence"], thresholds.closed,
                             scorer.name if self.mode == "confidence" else "text", _part(closed), steps=steps,
                             model_passes=1)
        if self._accepts(closed, thresholds.closed):
            result.seconds = time.perf_counter() - start
            return result
        open_row = None
        for _ in range(lookups):
            query, call_step = self._query(question)
            if call_step:
                steps.append(call_step)
                result.model_passes += 1
            found = self.registry.call(LOOKUP, {"query": query})
            steps.append({"step": "tool", "tool": LOOKUP, "arguments": found.arguments, "error": found.error,
                          "seconds": found.seconds, "passages": [p.id for p, _ in found.data or []]})
            if not found.ok:
                break
            open_row = self._draft(example_for(question, found.content), [*self.open_exemplars, *history], scorer)
            result.model_passes += 1
            steps.append({"step": "draft_with_evidence", "answer": open_row["answer"],
                          "confidence": open_row["confidence"]})
            result.open_book = _part(open_row)
            if self._accepts(open_row, thresholds.open):
                result.text, result.action = open_row["answer"], "lookup_answer"
                result.confidence, result.threshold = open_row["confidence"], thresholds.open
                result.seconds = time.perf_counter() - start
                return result
        result.text, result.action = self.backend.refusal, "decline"
        result.confidence = max(closed["confidence"], open_row["confidence"] if open_row else -math.inf)
        result.threshold = thresholds.open if open_row else thresholds.closed
        result.seconds = time.perf_counter() - start
        return result

    def _draft(self, example: dict, exemplars: Sequence[dict], scorer: Scorer) -> dict:
        """The draft row with its `answer` (the base's draft; in text mode what pass 2 wrote) and `confidence` (the
        scorer's; in text mode 1 unless pass 2 wrote the refusal)."""
        row = self.backend.drafts([example], exemplars)[0]
        if row.get("prompt_truncated"):
            raise ValueError("The question is too long: its prompt had to be cut to fit `max_prompt_tokens`, and an "
                             "answer to a cut question would not be the one the confidence is calibrated for.")
        if self.mode == "text":
            row["answer"] = self.backend.write([example], exemplars)[0]
            row["confidence"] = float(not is_refusal(row["answer"], self.backend.refusal or DEFAULT_REFUSAL))
        else:
            row["answer"] = row["pass1_answer"]
            row["confidence"] = float(np.asarray(scorer([row]))[0])
        return row

    def _accepts(self, row: dict, threshold: float) -> bool:
        if self.mode == "text":
            return row["confidence"] >= 1.0 and bool(row["answer"])
        return row["confidence"] >= threshold and bool(row["answer"])

    def _query(self, question: str) -> tuple[str, Optional[dict]]:
        """The lookup query: a chat model writes it inside a native tool call the controller starts (its text up to
        the end of the call is parsed; on failure the question itself is the query); otherwise the question."""
        if self.native is None:
            return question, None
        prompt, renderer, tokenizer = self.native
        messages = [{"role": "user", "content": question}]
        prefill = '<tool_call>\n{"name": "' + LOOKUP + '", "arguments": {"query": "'
        text = prompt.render(messages, self.registry.schemas()) + prefill
        model = self.backend.model
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        stops = [TOOL_CALL_STOP, *TURN_STOPS]
        width = inputs["input_ids"].shape[1]
        with model.disable_adapter():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([TextStop(tokenizer, stops, width)]))
        written = cut_at_stop(tokenizer.decode(out[0, width:], skip_special_tokens=False), stops,
                              keep=[TOOL_CALL_STOP])
        turn = renderer.parse(prefill + written, prefix=text[: -len(prefill)])
        calls = [c for c in turn.tool_calls if c["name"] == LOOKUP and str(c["arguments"].get("query", "")).strip()]
        step = {"step": "tool_call", "written": prefill + written, "parse_error": turn.parse_error,
                "content": turn.content}
        return (str(calls[0]["arguments"]["query"]) if calls else question), step
