"""`peft-doubter serve --backend llama.cpp`: the server on `llama-doubter --jsonl` (Gemma-3-270M's GGUF and a random
decision sidecar), called by the official `openai` client on 127.0.0.1. Replies equal the one-shot tool on the same
prompts; what only PyTorch can do is refused with a 400; concurrent clients get their own answers."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import httpx
import openai
import pytest
from test_llama_cpp import ATTENTIVE, make_sidecar
from test_serving import ask_server as ask_test_server
from test_serving import openai_client

from peft_doubter.agent.agent import example_for
from peft_doubter.data.collection import CollectConfig
from peft_doubter.data.prompts import PromptConfig, first_line
from peft_doubter.deploy import llama_cpp
from peft_doubter.names import SIDECAR_FILE
from peft_doubter.runs.manifest import write_manifest
from peft_doubter.serving import build_llama_cpp_service, running_server


pytestmark = pytest.mark.llama_cpp

EXEMPLARS = [
    {"id": "ex-1", "question": "What is the capital of Italy?", "answers": ["Rome"], "choices": [], "label": -1,
     "subject": ""},
    {"id": "ex-2", "question": "Who wrote Hamlet?", "answers": ["William Shakespeare"], "choices": [], "label": -1,
     "subject": ""},
]
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Who painted the Mona Lisa?"]
CALIBRATED = 0.5


def make_run(path, **sidecar):
    """A trained-and-exported run on the embedded Gemma-3-270M: its manifest (prompt format, exemplars, the
    threshold `eval` certified) and a random decision sidecar."""
    path.mkdir()
    write_manifest(path, {
        "collect": dataclasses.asdict(CollectConfig(model="gemma-3-270m", dataset="triviaqa", max_new_tokens=8)),
        "prompt": dataclasses.asdict(PromptConfig(k_shot=2)), "exemplars": EXEMPLARS,
        "evaluations": {"eval": {"threshold": CALIBRATED}}})
    make_sidecar(path / SIDECAR_FILE, gate=0.05, **sidecar)
    return path


@pytest.fixture(scope="module")
def build_dir():
    try:
        return llama_cpp.ensure_llama_cpp_build()
    except FileNotFoundError as err:
        pytest.skip(f"no llama.cpp build ({err})")


@pytest.fixture(scope="module")
def server(tmp_path_factory, build_dir):
    run = make_run(tmp_path_factory.mktemp("serve") / "run")
    service = build_llama_cpp_service(run, model_id="doubter-gemma", threads=1, build_dir=build_dir)
    with running_server(service) as url:
        yield {"url": url, "service": service, "run": run, "build_dir": build_dir}
    service.agent.backend.process.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server["url"])


def ask_server(client: openai.OpenAI, question: str, **doubter):
    return ask_test_server(client, question, "doubter-gemma", **doubter)


def test_health_names_the_backend(server, client):
    assert httpx.get(server["url"] + "/health").json()["backend"] == "llama.cpp"
    assert [m.id for m in client.models.list().data] == ["doubter-gemma"]


@pytest.mark.parametrize("threshold", [0.0, "calibrated", 1.0])
def test_replies_equal_the_one_shot_tool(server, client, threshold):
    backend = server["service"].agent.backend
    gate = CALIBRATED if threshold == "calibrated" else threshold
    for question in QUESTIONS:
        prompt, _ = backend._prompt(example_for(question), EXEMPLARS)
        assert prompt.endswith(f"Q: {question}\nA:") and "Q: Who wrote Hamlet?\nA: William Shakespeare" in prompt
        tool = llama_cpp.run_tool(llama_cpp_gguf(), prompt, sidecar=server["run"] / SIDECAR_FILE, n_predict=8,
                                  stop=["\n"], threshold=0.0, threads=1, build_dir=server["build_dir"])
        reply = ask_server(client, question, threshold=threshold)
        choice, extension = reply.choices[0], reply.choices[0].model_extra["doubter"]
        answered = tool["confidence"] >= gate and bool(first_line(tool["draft"]))
        assert extension["confidence"] == pytest.approx(tool["confidence"], abs=1e-9)
        assert extension["action"] == ("answer" if answered else "decline")
        assert choice.message.content == (first_line(tool["draft"]) if answered else backend.refusal)
        assert extension["threshold"] == pytest.approx(gate)
        assert (choice.message.refusal is not None) == (not answered)


def llama_cpp_gguf():
    from peft_doubter.tuner.base_models import embedded_gguf_path

    return embedded_gguf_path("gemma-3-270m")


@pytest.mark.parametrize("extra, message", [
    ({"doubter": {"gain": 2.0}}, "gain 1 only"),
    ({"doubter": {"mode": "agent"}}, "needs a lookup corpus"),
    ({"doubter": {"scorer": "min_token"}}, "is not served"),
    ({"logprobs": True}, "the llama.cpp back-end gives no token log-probabilities"),
])
def test_what_only_pytorch_can_do_is_refused(server, extra, message):
    body = {"model": "doubter-gemma", "messages": [{"role": "user", "content": QUESTIONS[0]}], **extra}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    scored = httpx.post(server["url"] + "/v1/doubter/score", json={"question": "Q", "answer": "A"}, timeout=60)
    assert scored.status_code == 400 and "needs the PyTorch back-end" in scored.json()["error"]["message"]


def test_over_long_and_empty_questions(server):
    for content, message in ((" ".join(["word"] * 5000), "is too long"), ("  ", "is empty")):
        body = {"model": "doubter-gemma", "messages": [{"role": "user", "content": content}]}
        response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_concurrent_clients_get_their_own_answers(client):
    expected = {q: ask_server(client, q, threshold=0.0).choices[0].message.content for q in QUESTIONS}
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(9)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        replies = list(pool.map(lambda q: (q, ask_server(client, q, threshold=0.0).choices[0].message.content), jobs))
    assert len(replies) == 9 and all(text == expected[q] for q, text in replies), "no reply lost or mixed up"


@pytest.mark.parametrize("reading", [{}, ATTENTIVE], ids=["prompt", "answer-attentive"])
def test_head_sidecar_is_served_with_its_head_confidence(tmp_path, build_dir, reading):
    """A `head` sidecar (reading the prompt, or the answer as TriviaQA's best Doubter does): the server's confidence
    is the head's the one-shot tool computes (before any pass 2)."""
    run = make_run(tmp_path / "head", **{"confidence": "head", **reading})
    service = build_llama_cpp_service(run, model_id="doubter-gemma", threads=1, build_dir=build_dir)
    try:
        with running_server(service) as url:
            prompt, _ = service.agent.backend._prompt(example_for(QUESTIONS[0]), EXEMPLARS)
            tool = llama_cpp.run_tool(llama_cpp_gguf(), prompt, sidecar=run / SIDECAR_FILE, n_predict=8, stop=["\n"],
                                      threshold=0.0, threads=1, build_dir=build_dir)
            reply = ask_server(openai_client(url), QUESTIONS[0], threshold=0.0)
    finally:
        service.agent.backend.process.close()
    assert tool["confidence_kind"] == "head" and tool["timing"]["pass2_prompt_ms"] < 1.0
    assert reply.choices[0].model_extra["doubter"]["confidence"] == pytest.approx(tool["confidence"], abs=1e-9)


def test_service_needs_an_exported_sidecar_it_can_score(tmp_path, build_dir):
    run = make_run(tmp_path / "ratio", confidence="ratio")
    with pytest.raises(ValueError, match=r"llama.cpp computes only the \('decision', 'head'\) confidences"):
        build_llama_cpp_service(run, threads=1, build_dir=build_dir)
    (run / SIDECAR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="run `peft-doubter export --run-dir"):
        build_llama_cpp_service(run, threads=1, build_dir=build_dir)
