"""`peft-doubter serve`: an OpenAI-compatible server that answers with the Doubter's confidence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..agent.agent import Thresholds
from ..names import AGENT_SCORERS
from ..runs.agents import build_agent, make_scorers, thresholds_of


def build_service(run_dir: Path, corpus: Optional[str] = None, model_id: Optional[str] = None,
                  scorers: tuple[str, ...] = AGENT_SCORERS):
    """The service for a trained run: its agent (with the lookup tool when `corpus` is given), every scorer, and
    their certified thresholds (closed book from `peft-doubter eval`, with a lookup from `agent eval`)."""
    from .service import DoubterService

    agent, manifest = build_agent(run_dir, corpus, "doubter", "0.5", "1")
    made = make_scorers(list(scorers), agent.backend.model, agent.backend.tokenizer, manifest, Path(run_dir))
    calibrated = {}
    for name in made:
        try:
            calibrated[name] = thresholds_of(Path(run_dir), corpus, name, None, None)
        except FileNotFoundError:
            calibrated[name] = Thresholds(math.inf)  # nothing certified: "calibrated" declines everything
    return DoubterService(agent, made, calibrated, model_id or f"doubter-{Path(run_dir).resolve().name}")


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, corpus: Optional[str] = None,
          model_id: Optional[str] = None) -> None:
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(build_service(run_dir, corpus, model_id)), host=host, port=port, log_level="warning")
