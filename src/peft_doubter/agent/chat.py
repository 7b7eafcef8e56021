"""A multi-turn chat over the agent: `peft-doubter chat --run-dir D`. Answered turns become the few-shot context of
the next question (the prompts the Doubter knows are question/answer pairs). Commands: /trace (show each step),
/threshold CLOSED [OPEN], /help, /quit (or end of input)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..data.scoring import normalize_answer
from .agent import AgentResult, MetaAgent, Thresholds


HELP = "Ask a question. /trace toggles the trace, /threshold CLOSED [OPEN] sets the gates, /quit ends."


@dataclass
class Session:
    """The conversation so far: results, and the answered turns that precede the next question."""

    agent: MetaAgent
    max_history: int = 4
    results: list[AgentResult] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def ask(self, question: str) -> AgentResult:
        asked = normalize_answer(question)
        context = [turn for turn in self.history if normalize_answer(turn["question"]) != asked]
        result = self.agent.run(question, history=context[-self.max_history:])
        self.results.append(result)
        if result.action != "decline":
            self.history.append({"id": f"turn-{len(self.results)}", "question": question.strip(),
                                 "answers": [result.text], "choices": [], "label": -1})
        return result


class ChatLoop:
    """Reads questions and commands from `read` (a prompt function, like `input`) until /quit or end of input."""

    def __init__(self, session: Session, read: Callable[[str], str] = input,
                 write: Callable[[str], None] = print) -> None:
        self.session, self.read, self.write, self.trace = session, read, write, False

    def run(self) -> None:
        self.write(HELP)
        while True:
            try:
                line = self.read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.write("")
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            if line.startswith("/"):
                self.command(line)
                continue
            try:
                result = self.session.ask(line)
            except ValueError as error:
                self.write(f"error: {error}")
                continue
            self.write(f"doubter> {result.text}")
            self.write(f"  [{result.action}, confidence {result.confidence:.3f}, threshold {result.threshold:.3f}, "
                       f"scorer {result.scorer}]")
            if self.trace:
                for step in result.steps:
                    self.write(f"  - {step}")

    def command(self, line: str) -> None:
        name, *arguments = line.split()
        if name == "/trace":
            self.trace = not self.trace
            self.write(f"trace {'on' if self.trace else 'off'}")
        elif name == "/threshold" and 1 <= len(arguments) <= 2:
            try:
                values = [float(a) for a in arguments]
                self.session.agent.thresholds = Thresholds(values[0], values[1] if len(values) > 1 else math.inf)
                self.write(f"thresholds: closed {values[0]:g}, open {values[1] if len(values) > 1 else math.inf:g}")
            except ValueError as error:
                self.write(f"error: {error}")
        else:
            self.write(HELP)
