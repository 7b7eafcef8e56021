"""What the server does per request, apart from HTTP: answer (or decline, or look up) with the Doubter's confidence,
through the same agent loop as `peft-doubter agent run` and `ask --threshold`, one request at a time."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..agent.agent import AgentResult, MetaAgent, Thresholds
from ..agent.scorers import Scorer
from ..names import AGENT_SCORERS


SERVE_MODES = ("answer_or_decline", "agent", "off")


class RequestError(ValueError):
    """A request the server cannot honour: becomes an OpenAI-style error object with this status and code."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error",
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class DoubterOptions:
    """The request's `doubter` extension (through the OpenAI SDK's `extra_body`)."""

    mode: str = "answer_or_decline"
    threshold: Any = "calibrated"
    lookup_threshold: Any = "calibrated"
    scorer: str = "doubter"
    gain: float = 1.0
    trace: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SERVE_MODES:
            raise RequestError(f"doubter.mode must be one of {SERVE_MODES}, got {self.mode!r}.", param="doubter.mode")
        if self.scorer not in AGENT_SCORERS:
            raise RequestError(f"doubter.scorer must be one of {AGENT_SCORERS}, got {self.scorer!r}.",
                               param="doubter.scorer")
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not math.isfinite(self.gain) \
                or self.gain < 0:
            raise RequestError(f"doubter.gain must be a finite number >= 0, got {self.gain!r}.", param="doubter.gain")
        for name in ("threshold", "lookup_threshold"):
            value = getattr(self, name)
            if value != "calibrated" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 <= value <= 1):
                raise RequestError(f"doubter.{name} must be 'calibrated' or a confidence in [0, 1], got {value!r}.",
                                   param=f"doubter.{name}")


class DoubterService:
    """One run's agent (its backend, exemplars and, with a corpus, the lookup tool) behind a lock; `scorers` are
    the gates a request may choose and `calibrated` their certified thresholds."""

    def __init__(self, agent: MetaAgent, scorers: dict[str, Scorer], calibrated: dict[str, Thresholds],
                 model_id: str) -> None:
        self.agent, self.scorers, self.calibrated, self.model_id = agent, scorers, calibrated, model_id
        self.lock = threading.Lock()
        self.started = int(time.time())

    def thresholds(self, options: DoubterOptions) -> Thresholds:
        if options.mode == "off":
            return Thresholds(0.0)
        certified = self.calibrated[options.scorer]
        closed = certified.closed if options.threshold == "calibrated" else float(options.threshold)
        opened = certified.open if options.lookup_threshold == "calibrated" else float(options.lookup_threshold)
        return Thresholds(closed, opened if options.mode == "agent" else math.inf)

    def answer(self, question: str, options: DoubterOptions, history: Sequence[dict] = ()) -> AgentResult:
        """The question's result under the options (`off`: the base's draft whatever the confidence); `history`
        holds the conversation's earlier answered turns."""
        if options.scorer not in self.scorers:
            raise RequestError(f"doubter.scorer {options.scorer!r} is not served (served: {sorted(self.scorers)}).",
                               param="doubter.scorer")
        if options.mode == "agent" and not self.agent.max_lookups:
            raise RequestError("doubter.mode 'agent' needs a lookup corpus: start the server with --corpus.",
                               param="doubter.mode")
        with self.lock, self.agent.backend.injection_gain(options.gain):
            return self.agent.run(question, history, scorer=self.scorers[options.scorer],
                                  thresholds=self.thresholds(options),
                                  lookups=self.agent.max_lookups if options.mode == "agent" else 0)

    def score(self, question: str, answer: str, scorer: str = "doubter", gain: float = 1.0) -> dict[str, Any]:
        """The confidence a scorer gives `answer` to `question` (any answer, not only the base's)."""
        if scorer not in self.scorers:
            raise RequestError(f"scorer {scorer!r} is not served (served: {sorted(self.scorers)}).", param="scorer")
        with self.lock, self.agent.backend.injection_gain(gain):
            row = self.agent.backend.read_answer(question, answer, self.agent.exemplars)
            confidence = float(self.scorers[scorer]([row])[0])
        return {"question": question, "answer": answer, "confidence": confidence, "scorer": scorer,
                "threshold": self.calibrated[scorer].closed}
