"""The agent on a run directory: build it from the run's model and exemplars, evaluate every gate on cached
questions (`peft-doubter agent eval`), record the calibrated thresholds in run.json, and answer live questions with
them (`peft-doubter agent run`, `peft-doubter chat`, the server)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from ..agent.agent import MetaAgent, Thresholds, TorchBackend
from ..agent.comparison import AgentComparison, agreement, build_cache, varied_thresholds, write_report
from ..agent.retrieval import Corpus, answer_recall, lookup_tool
from ..agent.scorers import DoubterScorer, MinTokenScorer, ProbeScorer, RandomScorer
from ..agent.tools import ToolRegistry
from ..data.collection import load_cache, make_judge
from ..data.prompts import PromptConfig
from ..names import AGENT_SCORERS as SCORERS
from ..paths import check_writable, run_directory_lock
from .manifest import injection_trained, read_manifest, write_manifest
from .stages import load_run_model


AGENT_DIR = "agent"


def make_scorers(names: list[str], model, tokenizer, manifest: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    prompt = PromptConfig(**manifest["prompt"])
    unknown = sorted(set(names) - set(SCORERS))
    if unknown:
        raise ValueError(f"Unknown scorers {unknown}: choose from {SCORERS}.")
    made: dict[str, Any] = {}
    for name in names:
        if name == "doubter":
            made[name] = DoubterScorer(model, tokenizer, prompt.mc_format, prompt.style == "chat")
        elif name == "min_token":
            made[name] = MinTokenScorer()
        elif name == "probe":
            cache = load_cache(Path(run_dir) / manifest["cache"])
            made[name] = ProbeScorer([cache[i] for i, s in enumerate(cache["split"]) if s == "train"])
        else:
            made[name] = RandomScorer()
    return made


def thresholds_of(run_dir: Path, corpus: Optional[str], scorer: str, closed: Optional[str],
                  lookup: Optional[str]) -> Thresholds:
    """The gates: numbers as given, or 'calibrated' (the values `agent eval` certified for this corpus and scorer;
    without an agent evaluation, the closed-book threshold `peft-doubter eval` certified and no lookup)."""
    def value(text: Optional[str], certified: float) -> float:
        if text in (None, "calibrated"):
            return certified
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"A threshold is a number in [0, 1] or 'calibrated', got {text!r}.") from None
        return number

    manifest = read_manifest(run_dir)
    certified = manifest.get("agent", {}).get(_key(corpus), {}).get(scorer)
    if certified is None:
        evaluation = manifest.get("evaluations", {}).get("eval")
        if (closed in (None, "calibrated") or lookup == "calibrated") and evaluation is None and scorer == "doubter":
            raise FileNotFoundError(f"{run_dir} has no calibrated threshold: run `peft-doubter eval` (closed book) "
                                    "or `peft-doubter agent eval` (with a corpus) first, or pass numbers.")
        certified = {"closed": (evaluation or {}).get("threshold", 0.5), "open": math.inf}
    return Thresholds(value(closed, certified["closed"]), value(lookup, certified["open"]))


def _key(corpus: Optional[str]) -> str:
    return re.sub(r"[^\w.+-]", "_", corpus or "closed-book")


def lookup_registry(corpus: Optional[str], k: int = 1) -> ToolRegistry:
    """The agent's tools: the lookup over `corpus` (none without one)."""
    registry = ToolRegistry()
    if corpus:
        registry.register(lookup_tool(Corpus.named(corpus), k=k))
    return registry


def _check_text_mode(run_dir: Path, manifest: dict[str, Any], fix: str) -> None:
    """The text-mode gate reads pass 2's refusal: refused for a head-only Doubter, whose pass 2 never declines."""
    if not injection_trained(manifest):
        raise ValueError(f"{run_dir}'s injection was not trained (a head-only Doubter): pass 2 writes the base's own "
                         f"answer and never declines, so there is no text to gate on. {fix}")


def build_agent(run_dir: Path, corpus: Optional[str] = None, scorer: str = "doubter", closed: Optional[str] = None,
                lookup: Optional[str] = None, mode: str = "confidence", model=None, tokenizer=None,
                lookup_k: int = 1) -> tuple[MetaAgent, dict[str, Any]]:
    """(agent, run manifest) for a trained run; `corpus` names the lookup tool's passages (None: no lookup)."""
    run_dir = Path(run_dir)
    if model is None:
        model, tokenizer, manifest = load_run_model(run_dir)
    else:
        manifest = read_manifest(run_dir)
    if mode == "text":
        _check_text_mode(run_dir, manifest, "Use --mode confidence.")
    registry = lookup_registry(corpus, lookup_k)
    scorers = make_scorers([scorer], model, tokenizer, manifest, run_dir) if mode == "confidence" else {
        scorer: RandomScorer()}
    thresholds = thresholds_of(run_dir, corpus, scorer, closed, lookup)
    agent = MetaAgent(TorchBackend(model, tokenizer, manifest), scorers[scorer], thresholds, manifest["exemplars"],
                      registry, mode=mode, tokenizer=tokenizer)
    return agent, manifest


def agent_eval(run_dir: Path, corpus: str, questions_from: Optional[str] = None, scorers: Optional[list[str]] = None,
               max_questions: Optional[int] = None, verify: int = 0, target_risk: Optional[float] = None,
               text_mode: Optional[bool] = None, lookup_k: int = 1) -> dict[str, Any]:
    """Cache closed- and open-book drafts of the calibration (val) and test questions, compare every policy, and
    record each scorer's calibrated thresholds in run.json. `questions_from` takes the questions from another run
    (same base; the run's Doubter then works zero-shot on them). `text_mode` (the seeds' gate on pass 2's text)
    defaults to whether the run's injection was trained."""
    run_dir = Path(run_dir)
    check_writable(run_dir / AGENT_DIR)
    with run_directory_lock(run_dir):
        model, tokenizer, manifest = load_run_model(run_dir)
        if text_mode is None:
            text_mode = injection_trained(manifest)
        elif text_mode:
            _check_text_mode(run_dir, manifest, "Leave text mode off.")
        names = scorers or list(SCORERS)
        made = make_scorers(names, model, tokenizer, manifest, run_dir)
        agent, _ = build_agent(run_dir, corpus, names[0], "1", "1", model=model, tokenizer=tokenizer,
                               lookup_k=lookup_k)
        source = Path(questions_from) if questions_from else run_dir
        source_manifest = read_manifest(source)
        cache = load_cache(source / source_manifest["cache"])
        questions = [cache[i] for i, s in enumerate(cache["split"]) if s in ("val", "test")][:max_questions]
        out = run_dir / AGENT_DIR / f"{_key(corpus)}-{source.resolve().name}"
        recall = answer_recall(Corpus.named(corpus), [q["question"] for q in questions],
                               [q["answers"] for q in questions], k=lookup_k)
        rows = build_cache(agent, made, questions, make_judge(source_manifest["collect"]["judge"]), out / "cache",
                           text_mode=text_mode)
        comparison = AgentComparison(rows, names, target_risk=target_risk)
        result = comparison.run()
        result.update({"corpus": corpus, "answer_recall_top_k": recall, "lookup_k": lookup_k,
                       "questions_from": str(source), "scorers": names})
        if verify:
            agent.scorer = made.get("doubter", made[names[0]])
            sample = [r for r in rows if r["split"] == "test"][:verify]
            result["live_agreement"] = agreement(agent, varied_thresholds(sample, agent.scorer.name), sample,
                                                 agent.scorer.name)
        write_report(result, out)
        manifest.setdefault("agent", {})[_key(corpus)] = {
            scorer: {"closed": c["closed"]["threshold"], "open": c["open"]["threshold"] if c["open"] else math.inf}
            for scorer, c in result["calibrated"].items()}
        write_manifest(run_dir, manifest)
        return result
