"""The OpenAI-compatible server, on a real uvicorn on 127.0.0.1, called by the official `openai` client: answers equal
`ask --threshold` and the agent, streaming, the score endpoint, bad requests as OpenAI error objects, concurrent
clients, and a client that disconnects mid-stream."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re

import httpx
import openai
import pytest

from peft_doubter.runs.ask import ask, calibrated_threshold
from peft_doubter.runs.stages import load_run_model
from peft_doubter.serving import build_service, running_server


QUESTIONS = ["w10 w11 w12", "w20 w21", "w33 w34 w35 w36", "w40"]


@pytest.fixture(scope="module")
def server(trained):
    service = build_service(trained["run"], corpus=str(trained["corpus"]), model_id="doubter-tiny")
    with running_server(service) as url:
        yield {"url": url, "service": service, "run": trained["run"]}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server["url"])


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask_server(client: openai.OpenAI, question: str, model: str = "doubter-tiny", **doubter):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          extra_body={"doubter": doubter} if doubter else None)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["doubter-tiny"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_answers_equal_ask_with_the_calibrated_threshold(server, client):
    model, tokenizer, _ = load_run_model(server["run"])
    threshold = calibrated_threshold(server["run"])
    for question in QUESTIONS:
        local = ask(server["run"], question, model=model, tokenizer=tokenizer, threshold=threshold)
        reply = ask_server(client, question)
        choice = reply.choices[0]
        extension = choice.model_extra["doubter"]
        assert choice.message.content == local.text
        assert extension["confidence"] == pytest.approx(local.confidence, abs=1e-6)
        assert extension["action"] == ("decline" if local.declined else "answer")
        assert extension["threshold"] == (pytest.approx(threshold) if math.isfinite(threshold) else None)
        assert extension["scorer"] == "doubter"
        assert (choice.message.refusal == local.text) == local.declined
        assert reply.usage.prompt_tokens > 0 and reply.model == "doubter-tiny"


def test_agent_mode_equals_the_agent_run(server, client):
    service = server["service"]
    for question in QUESTIONS[:2]:
        reply = ask_server(client, question, mode="agent", threshold=1.0, lookup_threshold=0.0)
        extension = reply.choices[0].model_extra["doubter"]
        local = service.agent.run(question, thresholds=service.thresholds(
            type("O", (), {"mode": "agent", "scorer": "doubter", "threshold": 1.0, "lookup_threshold": 0.0})()))
        assert extension["action"] == local.action and reply.choices[0].message.content == local.text
        assert [s["step"] for s in extension["steps"]][:2] == ["draft", "tool"]


def test_streaming_gives_the_decision_first(client):
    stream = client.chat.completions.create(model="doubter-tiny", stream=True,
                                            messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and "confidence" in first.model_extra["doubter"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask_server(client, QUESTIONS[0]).choices[0].message.content
    assert chunks[-1].usage.total_tokens > 0


def test_score_endpoint_and_the_gain_knob(server):
    base = server["url"]
    scored = httpx.post(base + "/v1/doubter/score", json={"question": "w10 w11", "answer": "w12"}, timeout=60).json()
    assert 0.0 <= scored["confidence"] <= 1.0 and scored["scorer"] == "doubter"
    again = httpx.post(base + "/v1/doubter/score", json={"question": "w10 w11", "answer": "w12"}, timeout=60).json()
    assert again["confidence"] == scored["confidence"]
    off = httpx.post(base + "/v1/doubter/score", json={"question": "w10 w11", "answer": "w12", "gain": 0.0},
                     timeout=60).json()
    assert off["confidence"] != scored["confidence"], "gain 0 removes the injection, so the confidence moves"


@pytest.mark.parametrize("body,status,message", [
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "temperature": 0.7}, 400,
     r"`temperature` cannot be honoured"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "n": 2}, 400, "`n` cannot be"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function"}]},
     400, "`tools` cannot be honoured"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "frobnicate": 1}, 400,
     "Unknown field `frobnicate`"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "w1"}]}, 404, "does not exist"),
    ({"model": "doubter-tiny", "messages": []}, 400, "Invalid request at `messages`"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "   "}]}, 400, "is empty"),
    ({"model": "doubter-tiny", "messages": [{"role": "system", "content": "Be nice."},
                                            {"role": "user", "content": "w1"}]}, 400, "system message"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": " ".join(["w5"] * 400)}]}, 400,
     "is too long|longer than the base model's context"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "doubter": {"mode": "dream"}}, 400,
     "doubter.mode must be one of"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "doubter": {"gain": -1}}, 400,
     "doubter.gain"),
    ({"model": "doubter-tiny", "messages": [{"role": "user", "content": "w1"}], "doubter": {"colour": 1}}, 400,
     "Unknown `doubter` options"),
])
def test_bad_requests_get_openai_error_objects(server, body, status, message):
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert re.search(message, error["message"]) and error["type"] == "invalid_request_error"


def test_malformed_json_and_the_sdk_error(server, client):
    response = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="`temperature` cannot be honoured"):
        client.chat.completions.create(model="doubter-tiny", messages=[{"role": "user", "content": "w1"}],
                                       temperature=1.0)


def test_concurrent_clients_get_their_own_answers(server, client):
    expected = {q: ask_server(client, q).choices[0].message.content for q in QUESTIONS}
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(lambda q: (q, ask_server(client, q).choices[0].message.content), jobs))
    assert len(replies) == 12 and all(text == expected[q] for q, text in replies), "no reply lost or mixed up"


def test_a_client_leaving_mid_stream_leaves_the_server_healthy(server, client):
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", timeout=60,
                      json={"model": "doubter-tiny", "stream": True,
                            "messages": [{"role": "user", "content": QUESTIONS[2]}]}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and "doubter" in json.loads(first[6:])["choices"][0]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert ask_server(client, QUESTIONS[3]).choices[0].message.content is not None
    assert not math.isnan(ask_server(client, QUESTIONS[3]).choices[0].model_extra["doubter"]["confidence"])
