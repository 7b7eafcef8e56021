"""`peft-doubter serve`: an OpenAI-compatible server that answers with the Doubter's confidence, on PyTorch or on
llama.cpp (`llama-doubter --jsonl`, no PyTorch compute)."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ..agent.agent import MetaAgent, Thresholds
from ..names import AGENT_SCORERS, SERVE_BACKENDS, SIDECAR_FILE
from ..runs.agents import build_agent, lookup_registry, make_scorers, thresholds_of
from ..runs.manifest import read_manifest


def _calibrated(run_dir: Path, corpus: Optional[str], scorer: str) -> Thresholds:
    try:
        return thresholds_of(Path(run_dir), corpus, scorer, None, None)
    except FileNotFoundError:
        return Thresholds(math.inf)  # nothing certified: "calibrated" declines everything


def build_service(run_dir: Path, corpus: Optional[str] = None, model_id: Optional[str] = None,
                  scorers: tuple[str, ...] = AGENT_SCORERS):
    """The PyTorch service for a trained run: its agent (with the lookup tool when `corpus` is given), every scorer,
    and their certified thresholds (closed book from `peft-doubter eval`, with a lookup from `agent eval`)."""
    from .service import DoubterService

    agent, manifest = build_agent(run_dir, corpus, "doubter", "0.5", "1")
    made = make_scorers(list(scorers), agent.backend.model, agent.backend.tokenizer, manifest, Path(run_dir))
    calibrated = {name: _calibrated(run_dir, corpus, name) for name in made}
    return DoubterService(agent, made, calibrated, model_id or f"doubter-{Path(run_dir).resolve().name}")


def build_llama_cpp_service(run_dir: Path, gguf: Optional[Path] = None, corpus: Optional[str] = None,
                            model_id: Optional[str] = None, threads: int = 2, build_dir: Optional[Path] = None):
    """The service for a trained and exported run on llama.cpp: the run's sidecar on `gguf` (default: the GGUF of
    the run's embedded base), the run's prompt format, exemplars and certified thresholds; the Doubter is the only
    scorer (the others need PyTorch's reading of the answer)."""
    from ..agent.llama_cpp_backend import LlamaCppBackend, ToolConfidenceScorer
    from ..deploy.llama_cpp import LlamaDoubterProcess
    from ..tuner.base_models import EMBEDDED_MODELS, embedded_gguf_path, load_tokenizer
    from .service import DoubterService

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    sidecar = run_dir / SIDECAR_FILE
    if not sidecar.is_file():
        raise FileNotFoundError(f"{run_dir} has no {SIDECAR_FILE}: run `peft-doubter export --run-dir {run_dir}` "
                                "first.")
    base = manifest["collect"]["model"]
    if gguf is None:
        if base not in EMBEDDED_MODELS:
            raise ValueError(f"The run's base {base!r} is not an embedded model: pass its GGUF with --gguf.")
        gguf = embedded_gguf_path(base)
    gguf = Path(gguf)
    tokenizer = load_tokenizer(base)  # the tokenizer the run's prompts were built with
    scorer = ToolConfidenceScorer()
    calibrated = _calibrated(run_dir, corpus, scorer.name)
    process = LlamaDoubterProcess(gguf, sidecar, threads=threads, build_dir=build_dir)
    try:
        backend = LlamaCppBackend(process, tokenizer, manifest)
        agent = MetaAgent(backend, scorer, calibrated, manifest["exemplars"], lookup_registry(corpus))
    except BaseException:
        process.close()
        raise
    return DoubterService(agent, {scorer.name: scorer}, {scorer.name: calibrated},
                          model_id or f"doubter-{run_dir.resolve().name}")


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, corpus: Optional[str] = None,
          model_id: Optional[str] = None, backend: str = "pytorch", gguf: Optional[Path] = None,
          threads: int = 2) -> None:
    import uvicorn

    from .app import create_app

    if backend not in SERVE_BACKENDS:
        raise ValueError(f"`backend` must be one of {SERVE_BACKENDS}, got {backend!r}.")
    service = build_service(run_dir, corpus, model_id) if backend == "pytorch" else \
        build_llama_cpp_service(run_dir, gguf, corpus, model_id, threads)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


@contextlib.contextmanager
def running_server(service, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `service` with uvicorn in a background thread for the block (port 0: a free one); yields its URL."""
    import uvicorn

    from .app import create_app

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"The server did not start on {host}:{port}.")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
