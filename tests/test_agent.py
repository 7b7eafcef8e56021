"""The agent runtime: tools (bad arguments, a tool that raises, a tool that times out), retrieval, native tool-call
parsing, stop strings, both thresholds, text mode, the comparison of gates, live runs that reproduce the simulation,
and the chat REPL through a pseudo-terminal."""

from __future__ import annotations

import math
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import tiny_run

from peft_doubter.agent import (
    AgentComparison,
    ChatLoop,
    Corpus,
    MetaAgent,
    NativeToolPrompt,
    NativeToolRenderer,
    Passage,
    Session,
    Thresholds,
    Tool,
    ToolRegistry,
    TorchBackend,
    answer_recall,
    lookup_tool,
)
from peft_doubter.agent.comparison import agreement, build_cache, cache_features, frontier, varied_thresholds
from peft_doubter.agent.scorers import MinTokenScorer, RandomScorer
from peft_doubter.data.collection import load_cache, make_judge
from peft_doubter.runs import stages
from peft_doubter.runs.manifest import read_manifest


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def agent_of(trained: dict, thresholds: Thresholds, registry: ToolRegistry | None = None, mode: str = "confidence",
             scorer=None) -> MetaAgent:
    model, tokenizer, manifest = stages.load_run_model(trained["run"])
    backend = TorchBackend(model, tokenizer, manifest)
    registry = registry if registry is not None else ToolRegistry()
    return MetaAgent(backend, scorer or MinTokenScorer(), thresholds, manifest["exemplars"], registry, mode=mode)


def test_tool_errors_become_observations():
    def add(a: int, b: int) -> tuple[str, int]:
        """Add two numbers.

        Args:
            a: The first.
            b: The second.
        """
        return str(a + b), a + b

    def broken(query: str) -> tuple[str, None]:
        """Always fails.

        Args:
            query: Ignored.
        """
        raise RuntimeError("the index is gone")

    def slow(query: str) -> tuple[str, None]:
        """Takes too long.

        Args:
            query: Ignored.
        """
        time.sleep(3)
        return "late", None

    registry = ToolRegistry()
    registry.register(Tool.from_function(add))
    registry.register(Tool.from_function(broken))
    registry.register(Tool.from_function(slow, timeout=0.2))
    assert registry.call("add", {"a": 2, "b": 3}).content == "5"
    assert registry.call("add", '{"a": 2, "b": 3}').data == 5
    assert "invalid arguments" in registry.call("add", {"a": "two", "b": 3}).observation()
    assert "not JSON" in registry.call("add", "{a: 2").error
    assert "no tool named 'sub'" in registry.call("sub", {}).error
    assert registry.call("broken", {"query": "x"}).error == "RuntimeError: the index is gone"
    started = time.perf_counter()
    result = registry.call("slow", {"query": "x"})
    assert result.error == "timed out after 0.2 s" and time.perf_counter() - started < 2
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Tool.from_function(add))
    assert {s["function"]["name"] for s in registry.schemas()} == {"add", "broken", "slow"}


def test_bm25_lookup_and_answer_recall(tmp_path):
    corpus = Corpus([Passage("a", "Lima is the capital of Peru."), Passage("b", "Paris is the capital of France."),
                     Passage("c", "Ottawa is in Canada.")])
    assert corpus.search(["capital of Peru"], k=2)[0][0][0].id == "a"
    tool = lookup_tool(corpus, k=1)
    assert tool.run(query="France capital")[0] == "Paris is the capital of France."
    assert answer_recall(corpus, ["capital of Peru?", "capital of Canada?"], [["Lima"], ["Toronto"]]) == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: a passage needs a JSON object with `text`"):
        Corpus.from_jsonl(bad)
    with pytest.raises(ValueError, match="Unknown corpus"):
        Corpus.named("wikipedia")


def test_native_tool_prompt_and_parsing():
    tokenizer = tiny_run.tiny_tokenizer()
    with pytest.raises(ValueError, match="need a chat model"):
        NativeToolPrompt(tokenizer)
    tokenizer.chat_template = CHATML  # ignores `tools`: the bundled Hermes template takes over
    prompt = NativeToolPrompt(tokenizer)
    tools = [lookup_tool(Corpus([Passage("a", "w1")])).schema()]
    text = prompt.render([{"role": "user", "content": "w5 w6"}], tools)
    assert prompt.ignores_tools and "<tools>" in text and '"name": "lookup"' in text
    assert prompt.render([{"role": "user", "content": "w5"}]) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "w5"}], add_generation_prompt=True, tokenize=False)
    renderer = NativeToolRenderer(tokenizer)
    call = renderer.parse('<tool_call>\n{"name": "lookup", "arguments": {"query": "Peru"}}\n</tool_call><|im_end|>')
    assert call.tool_calls == [{"name": "lookup", "arguments": {"query": "Peru"}}] and call.parse_error is None
    two = renderer.parse('<tool_call>{"name": "lookup", "arguments": {"query": "a"}}</tool_call>\n'
                         '<tool_call>{"name": "lookup", "arguments": {"query": "b"}}</tool_call>')
    assert [c["arguments"]["query"] for c in two.tool_calls] == ["a", "b"]
    malformed = renderer.parse('Let me see <tool_call>{"name": lookup</tool_call>')
    assert malformed.tool_calls == [] and "JSON" in malformed.parse_error
    assert "Let me see" in malformed.content, "unparsed text stays in the reply"
    assert renderer.parse("Lima.<|im_end|>").content == "Lima."


def test_stop_strings_end_a_tool_call(trained):
    """A chat model writing a lookup query stops at the end of the call, never writing the next turn."""
    model, tokenizer, _ = stages.load_run_model(trained["run"])
    tokenizer.chat_template = CHATML
    registry = ToolRegistry()
    registry.register(lookup_tool(Corpus.from_jsonl(trained["corpus"])))
    backend = TorchBackend(model, tokenizer, read_manifest(trained["run"]))
    agent = MetaAgent(backend, MinTokenScorer(), Thresholds(1.0, 0.0), read_manifest(trained["run"])["exemplars"],
                      registry, tokenizer=tokenizer)
    result = agent.run("w10 w11 w12 w13")
    call = next(step for step in result.steps if step["step"] == "tool_call")
    written = call["written"]
    assert "<|im_start|>" not in written and written.count("</tool_call>") <= 1
    lookup = next(step for step in result.steps if step["step"] == "tool")
    query = lookup["arguments"]["query"]
    assert query == "w10 w11 w12 w13" or call["parse_error"] is None, "an unparsed call falls back to the question"


def test_thresholds_choose_answer_lookup_or_decline(trained):
    registry = ToolRegistry()
    registry.register(lookup_tool(Corpus.from_jsonl(trained["corpus"])))
    question = load_cache(trained["run"] / "cache")[0]["question"]
    assert agent_of(trained, Thresholds(0.0, 0.0), registry).run(question).action == "answer"
    never_closed = agent_of(trained, Thresholds(math.inf, 0.0), registry).run(question)
    assert never_closed.action == "lookup_answer" and never_closed.open_book is not None
    assert [s["step"] for s in never_closed.steps] == ["draft", "tool", "draft_with_evidence"]
    declined = agent_of(trained, Thresholds(math.inf, math.inf), registry).run(question)
    assert declined.action == "decline" and declined.text == "I'm not confident enough to answer this question accurately."
    no_tool = agent_of(trained, Thresholds(math.inf, 0.0)).run(question)
    assert no_tool.action == "decline" and [s["step"] for s in no_tool.steps] == ["draft"]
    with pytest.raises(ValueError, match="threshold must be a confidence"):
        Thresholds(math.nan)


def test_a_failing_lookup_declines_with_the_error_in_the_trace(trained):
    def lookup(query: str) -> tuple[str, None]:
        """Broken.

        Args:
            query: What to look up.
        """
        raise OSError("corpus unreadable")

    registry = ToolRegistry()
    registry.register(Tool.from_function(lookup))
    result = agent_of(trained, Thresholds(math.inf, 0.0), registry).run("w10 w11")
    tool = next(step for step in result.steps if step["step"] == "tool")
    assert result.action == "decline" and tool["error"] == "OSError: corpus unreadable"


def test_text_mode_follows_what_pass_2_writes(trained):
    registry = ToolRegistry()
    registry.register(lookup_tool(Corpus.from_jsonl(trained["corpus"])))
    result = agent_of(trained, Thresholds(0.5), registry, mode="text").run("w10 w11 w12")
    model, tokenizer, manifest = stages.load_run_model(trained["run"])
    written = TorchBackend(model, tokenizer, manifest).write([{"id": "q", "question": "w10 w11 w12", "answers": [],
                                                               "choices": [], "label": -1}], manifest["exemplars"])[0]
    refused = written.startswith("I'm not confident")
    assert (result.action != "answer") == refused and result.scorer == "text"


def test_text_mode_is_refused_for_a_head_only_doubter(trained, tmp_path):
    """A head-only Doubter's pass 2 writes the base's own answer and never declines: the text-mode gate is refused
    with the fix named, and `agent eval` leaves it out unless asked (then it is refused too)."""
    from peft_doubter.runs.agents import agent_eval, build_agent

    run_dir = tmp_path / "run"
    shutil.copytree(trained["run"], run_dir)
    for name in ("adapter", "eval"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    stages.train_run(run_dir, {"head_epochs": 1}, {"confidence": "head"})
    with pytest.raises(ValueError, match="injection was not trained.*Use --mode confidence"):
        build_agent(run_dir, mode="text")
    with pytest.raises(ValueError, match="injection was not trained.*Leave text mode off"):
        agent_eval(run_dir, str(trained["corpus"]), text_mode=True)


def synthetic_cache(n: int = 200, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    closed = rng.random(n) < 0.3
    opened = closed | (rng.random(n) < 0.5)
    signal = closed + rng.normal(0, 0.6, n)
    rows = {"id": [str(i) for i in range(n)], "question": ["q"] * n, "answers": [["a"]] * n, "passages": [[]] * n,
            "split": ["val" if i % 2 else "test" for i in range(n)]}
    for regime, right in (("closed", closed), ("open", opened)):
        rows |= {f"{regime}_answer": ["a"] * n, f"{regime}_correct": right.tolist(), f"{regime}_written": [""] * n,
                 f"{regime}_seconds": [1.0] * n, f"{regime}_good": (1 / (1 + np.exp(-signal))).tolist(),
                 f"{regime}_random": rng.random(n).tolist()}
    return datasets.Dataset.from_dict(rows, features=cache_features(["good", "random"]))


def test_agent_comparison_simulates_policies_on_the_same_answers():
    comparison = AgentComparison(synthetic_cache(), ["good", "random"])
    result = comparison.run()
    data = comparison.rows("test")
    policies = result["policies"]
    assert policies["never-lookup"]["pass_rate"] == pytest.approx(data["closed_correct"].mean())
    assert policies["always-lookup"]["pass_rate"] == pytest.approx(data["open_correct"].mean())
    assert policies["always-lookup"]["lookups_per_question"] == 1.0
    oracle = policies["oracle gate (lookup iff closed-book wrong)"]
    assert oracle["pass_rate"] >= policies["always-lookup"]["pass_rate"]
    assert result["frontiers"]["good"]["area"] > result["frontiers"]["random"]["area"]
    assert result["matched"]["good"]["lookups_saved"] > result["matched"]["random"]["lookups_saved"]
    for scorer in ("good", "random"):
        calibrated = result["calibrated"][scorer]
        assert calibrated["closed"]["n_calibration"] == 100
        assert policies[f"{scorer}, calibrated two thresholds"]["coverage"] == pytest.approx(calibrated["coverage"])
    assert any(name.startswith("random gate") for name in policies)
    gap = result["frontier_paired"]["good - random"]
    assert gap["ci_low"] > 0 and gap["diff"] == pytest.approx(
        result["frontiers"]["good"]["area"] - result["frontiers"]["random"]["area"])
    stored = result["per_question"]  # every summary comes back from the per-question record
    for name, summary in policies.items():
        assert np.mean(stored["right"][name]) == pytest.approx(summary["pass_rate"])
        assert np.mean(np.array(stored["actions"][name]) != "decline") == pytest.approx(summary["coverage"])
        assert np.mean(stored["lookups"][name]) == pytest.approx(summary["lookups_per_question"])
    again = frontier(np.array(stored["closed_correct"]), np.array(stored["open_correct"]),
                     np.array(stored["confidence"]["closed_good"]))
    assert again["area"] == pytest.approx(result["frontiers"]["good"]["area"])


def test_live_check_thresholds_meet_every_action():
    rows = [{"closed_s": c, "open_s": o} for c, o in zip(np.linspace(0, 1, 20), np.random.default_rng(0).random(20))]
    thresholds = varied_thresholds(rows, "s")
    actions = {"answer" if r["closed_s"] >= thresholds.closed else
               "lookup_answer" if r["open_s"] >= thresholds.open else "decline" for r in rows}
    assert actions == {"answer", "lookup_answer", "decline"}


def test_live_agent_reproduces_the_simulated_actions(trained, tmp_path):
    model, tokenizer, manifest = stages.load_run_model(trained["run"])
    registry = ToolRegistry()
    registry.register(lookup_tool(Corpus.from_jsonl(trained["corpus"])))
    scorer = MinTokenScorer()
    agent = MetaAgent(TorchBackend(model, tokenizer, manifest), scorer, Thresholds(0.5, 0.5), manifest["exemplars"],
                      registry)
    cache = load_cache(trained["run"] / "cache")
    questions = [cache[i] for i, s in enumerate(cache["split"]) if s == "test"][:6]
    rows = build_cache(agent, {"min_token": scorer, "random": RandomScorer()}, questions, make_judge("exact_match"),
                       tmp_path / "cache", text_mode=False, shard_size=4)
    closed = sorted(rows["closed_min_token"])
    thresholds = Thresholds(float(np.median(closed)), 0.0)  # some questions answered closed-book, some looked up
    check = agreement(agent, thresholds, list(rows), "min_token")
    assert check["matching"] == check["questions"] == 6, check["details"]
    assert {d["live"] for d in check["details"]} >= {"answer"}


def test_agent_cache_writes_pass_2_text_only_for_the_compared_split(trained, tmp_path):
    model, tokenizer, manifest = stages.load_run_model(trained["run"])
    registry = ToolRegistry()
    registry.register(lookup_tool(Corpus.from_jsonl(trained["corpus"])))
    agent = MetaAgent(TorchBackend(model, tokenizer, manifest), MinTokenScorer(), Thresholds(0.5, 0.5),
                      manifest["exemplars"], registry)
    cache = load_cache(trained["run"] / "cache")
    questions = [cache[i] for split in ("val", "test") for i in np.flatnonzero(np.array(cache["split"]) == split)[:2]]
    rows = build_cache(agent, {"min_token": MinTokenScorer()}, questions, make_judge("exact_match"),
                       tmp_path / "cache", text_mode=True, shard_size=4)
    for row in rows:
        for regime in ("closed", "open"):
            assert bool(row[f"{regime}_written"]) == (row["split"] == "test"), (row["split"], regime)


def test_chat_session_and_commands(trained):
    lines = iter(["", "/help", "/threshold 0 0", "w10 w11", "/trace", "w12 w13", "/threshold x", "/quit"])
    said: list[str] = []
    session = Session(agent_of(trained, Thresholds(0.5)))
    ChatLoop(session, read=lambda prompt: next(lines), write=said.append).run()
    assert len(session.results) == 2 and any(line.startswith("doubter>") for line in said)
    assert "thresholds: closed 0, open 0" in said and any("error:" in line for line in said)
    assert any(line.startswith("  - {'step': 'draft'") for line in said), "the trace shows each step"
    assert session.history and session.history[0]["question"] == "w10 w11"


def test_chat_cli_in_a_pseudo_terminal(trained):
    """`peft-doubter chat` read from a real terminal: a question, an answer with its action, then /quit."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "peft_doubter.cli.main", "chat", "--run-dir",
                                str(trained["run"]), "--threshold", "0", "--lookup-threshold", "0"],
                               stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(follower)

    def read_until(marker: str, seconds: float = 120) -> str:
        seen, deadline = b"", time.time() + seconds
        while marker.encode() not in seen and time.time() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        return seen.decode(errors="replace")

    try:
        assert "you>" in read_until("you>")
        os.write(leader, b"w10 w11 w12\n")
        reply = read_until("scorer doubter]")
        assert "doubter>" in reply and "confidence" in reply
        os.write(leader, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(leader)
