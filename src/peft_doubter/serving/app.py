"""An OpenAI-compatible HTTP server that answers with the Doubter's confidence (FastAPI + uvicorn).

    POST /v1/chat/completions   the answer, or the decline (also in `message.refusal`), and per choice a `doubter`
                                object: action, confidence, threshold, scorer, the closed-book draft and, in agent
                                mode, the lookup trace; streaming over SSE (the decision comes in the first chunk)
    GET  /v1/models             the served run
    GET  /health                liveness
    POST /v1/doubter/score      {"question", "answer"} -> the confidence in that answer

Request extension (OpenAI SDK: `extra_body={"doubter": {...}}`): `mode` (`answer_or_decline`, `agent`, `off`),
`threshold` and `lookup_threshold` (`"calibrated"` or a number), `scorer`, `gain` (scales the injection at request
time) and `trace`. Greedy decoding only: fields the server cannot honour (sampling, several choices, client tools,
system prompts that would change the calibrated prompt, ...) are refused with a 400 that names them, never
ignored. Errors are OpenAI-style error objects; no request can stop the server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..agent.agent import AgentResult
from .service import DoubterOptions, DoubterService, RequestError


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    refusal: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completion request; fields the Doubter cannot honour are checked in `_check`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    doubter: Optional[dict[str, Any]] = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    answer: str
    scorer: str = "doubter"
    gain: float = 1.0


def _check(request: ChatCompletionRequest, service: DoubterService, max_new_tokens: int) -> tuple[str, list[dict]]:
    """The question (the last user message) and the earlier answered turns, after refusing what cannot be
    honoured."""
    refusals = {
        "temperature": (request.temperature not in (None, 0, 0.0), ("greedy decoding only: the calibrated confidence "
                        "is for the greedy answer (use temperature 0 or leave it out)")),
        "top_p": (request.top_p not in (None, 1, 1.0), "greedy decoding only"),
        "n": (request.n not in (None, 1), "one choice per request (greedy decoding gives one answer)"),
        "stop": (bool(request.stop), ("answers end at their first line; other stop sequences would change the "
                 "answer the confidence is about")),
        "presence_penalty": (request.presence_penalty not in (None, 0, 0.0), "not supported"),
        "frequency_penalty": (request.frequency_penalty not in (None, 0, 0.0), "not supported"),
        "logit_bias": (bool(request.logit_bias), "not supported"),
        "top_logprobs": (request.top_logprobs not in (None, 0), ("only the answer tokens' own log-probabilities "
                         "(logprobs: true) are returned")),
        "tools": (bool(request.tools), ("client-side tools are not supported; `doubter.mode: agent` looks things "
                  "up on the server")),
        "tool_choice": (request.tool_choice not in (None, "none", "auto"), "client-side tools are not supported"),
        "response_format": (request.response_format not in (None, {"type": "text"}), "text answers only"),
    }
    for field, (refused, why) in refusals.items():
        if refused:
            raise RequestError(f"`{field}` cannot be honoured: {why}.", param=field, code="unsupported_parameter")
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None and limit < max_new_tokens:
        raise RequestError(f"`max_tokens` must be at least {max_new_tokens}: the Doubter drafts answers of up to "
                           f"{max_new_tokens} tokens and a shorter cut would change the answer it is calibrated on.",
                           param="max_tokens")
    if request.model != service.model_id:
        raise RequestError(f"The model {request.model!r} does not exist; this server serves {service.model_id!r}.",
                           status=404, code="model_not_found", param="model")
    for message in request.messages:
        if message.role in ("system", "developer") and message.text().strip():
            raise RequestError(f"A {message.role} message cannot be honoured: the Doubter's prompt format is fixed "
                               "(it is calibrated on it).", param="messages")
        if message.role == "tool":
            raise RequestError("Tool messages are not supported (client-side tools are not).", param="messages")
    if request.messages[-1].role != "user":
        raise RequestError("The last message must come from the user (the question).", param="messages")
    question = request.messages[-1].text()
    if not question.strip():
        raise RequestError("The question (the last user message) is empty.", param="messages")
    turns = [m for m in request.messages if m.role in ("user", "assistant")][:-1]
    history = [{"id": f"turn-{i}", "question": q.text(), "answers": [a.text()], "choices": [], "label": -1}
               for i, (q, a) in enumerate(zip(turns[::2], turns[1::2]))
               if q.role == "user" and a.role == "assistant" and a.text().strip() and not a.refusal]
    return question, history


def _finite(value: Any) -> Any:
    """JSON has no infinity: a threshold of inf (never answer) is sent as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _doubter_object(result: AgentResult, options: DoubterOptions) -> dict[str, Any]:
    """The per-choice extension; a null threshold means the gate never answers (nothing could be certified)."""
    out = {"action": result.action, "confidence": result.confidence, "threshold": result.threshold,
           "scorer": result.scorer, "mode": options.mode, "gain": options.gain,
           "closed_book": {k: result.closed_book[k] for k in ("answer", "confidence")},
           "seconds": result.seconds, "model_passes": result.model_passes}
    if result.open_book is not None:
        out["open_book"] = {k: result.open_book[k] for k in ("answer", "confidence")}
    if options.mode == "agent" or options.trace:
        out["steps"] = result.steps
    return _finite(out)


def _error(status: int, message: str, code: str = "invalid_request_error", param: Optional[str] = None
           ) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(service: DoubterService) -> FastAPI:
    """The FastAPI app around a `DoubterService`."""
    app = FastAPI(title="peft-doubter", version=__version__)
    backend = service.agent.backend
    tokenizer = backend.tokenizer
    max_new_tokens = backend.collect_config.max_new_tokens

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, str(error), error.code, error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _error(400, f"The request body is not valid JSON: {first.get('msg', '')}.")
        if kind == "extra_forbidden":
            return _error(400, f"Unknown field `{where}`: not an OpenAI chat-completion field this server knows.",
                          "unsupported_parameter", where)
        return _error(400, f"Invalid request at `{where}`: {first.get('msg', 'invalid value')}.", param=where)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"The server failed on this request ({type(error).__name__}: {error}); it keeps serving.",
                      "internal_error")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_id, "backend": backend.name,
                "lookup": bool(service.agent.max_lookups),
                "uptime_seconds": int(time.time()) - service.started}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.started,
                                            "owned_by": "peft-doubter"}]}

    @app.post("/v1/doubter/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        if not request.question.strip() or not request.answer.strip():
            raise RequestError("`question` and `answer` must not be empty.")
        try:
            return service.score(request.question, request.answer, request.scorer, request.gain)
        except ValueError as error:
            raise RequestError(str(error), code="context_length_exceeded" if "context" in str(error) else
                               "invalid_request_error") from None

    @app.post("/v1/chat/completions")
    def chat(request: ChatCompletionRequest):
        try:
            options = DoubterOptions(**(request.doubter or {}))
        except TypeError:
            known = list(DoubterOptions.__dataclass_fields__)
            unknown = sorted(set(request.doubter or {}) - set(known))
            raise RequestError(f"Unknown `doubter` options {unknown}; known: {known}.", param="doubter") from None
        question, history = _check(request, service, max_new_tokens)
        if request.logprobs and not backend.token_logprobs:
            raise RequestError(f"`logprobs` cannot be honoured: the {backend.name} back-end gives no token "
                               "log-probabilities.", param="logprobs", code="unsupported_parameter")
        try:
            result = service.answer(question, options, history)
        except RequestError:
            raise
        except ValueError as error:
            raise RequestError(str(error), code="context_length_exceeded" if "context" in str(error) else
                               "invalid_request_error", param="messages") from None
        declined = result.action == "decline"
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(tokenizer(part["prompt"], add_special_tokens=not backend.chat)["input_ids"])
                            for part in (result.closed_book, result.open_book) if part)
        completion_tokens = len(tokenizer(result.text, add_special_tokens=False)["input_ids"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        doubter = _doubter_object(result, options)
        logprobs = _logprobs(result, tokenizer) if request.logprobs and not declined else None
        headers = {"X-Doubter-Confidence": f"{result.confidence:.6f}", "X-Doubter-Action": result.action}
        base = {"id": completion_id, "created": created, "model": service.model_id,
                "system_fingerprint": f"peft-doubter-{__version__}"}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(_stream(base, result.text, declined, doubter, usage, include_usage, logprobs),
                                     media_type="text/event-stream", headers=headers)
        message = {"role": "assistant", "content": result.text, "refusal": result.text if declined else None}
        body = {**base, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop",
                             "doubter": doubter}]}
        return JSONResponse(body, headers=headers)

    return app


def _logprobs(result: AgentResult, tokenizer) -> Optional[dict[str, Any]]:
    part = result.open_book if result.action == "lookup_answer" else result.closed_book
    tokens, logprobs = part.get("answer_ids", []), part.get("token_logprobs", [])
    return {"content": [{"token": tokenizer.decode([t]), "logprob": float(lp), "bytes": None, "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)], "refusal": None}


def _stream(base: dict, text: str, declined: bool, doubter: dict, usage: dict, include_usage: bool,
            logprobs: Optional[dict]) -> Iterator[str]:
    """SSE chunks: the role and the decision first, then the text word by word, then the end (and usage)."""
    def chunk(delta: dict, finish: Optional[str] = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        body = {**base, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, doubter=doubter)
    if declined:
        yield chunk({"content": text, "refusal": text})
    else:
        words = text.split(" ")
        for index, word in enumerate(words):
            yield chunk({"content": word if index == 0 else f" {word}"})
    yield chunk({}, "stop")
    if include_usage:
        yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
