"""The llama.cpp deploy path: locate or build the patched llama.cpp, ctypes bindings to its Doubter API, and a
runner for the `llama-doubter` two-pass tool.

The build lives in a cache directory keyed by the patch's hash (see `llama_cpp_patch/build.py`); it is only
started by `ensure_llama_cpp_build(build=True)` or with `PEFT_DOUBTER_BUILD_LLAMA_CPP=1` in the environment.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np
from typing_extensions import Self

from ..names import READ_POSITIONS
from ..paths import asset_dir


BUILD_ENV = "PEFT_DOUBTER_BUILD_LLAMA_CPP"
PATCH_DIR = asset_dir("llama_cpp_patch")


def _build_module() -> ModuleType:
    script = PATCH_DIR / "build.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: reinstall peft-doubter (its wheel ships llama_cpp_patch/).")
    name = "_doubter_llama_cpp_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def find_llama_cpp_build() -> Optional[Path]:
    """The finished build for the current patch, or None."""
    return _build_module().find_build()


def ensure_llama_cpp_build(build: Optional[bool] = None) -> Path:
    """The build directory of the patched llama.cpp (binaries in `build/bin`). Builds it when missing and `build`
    is true (default: when `PEFT_DOUBTER_BUILD_LLAMA_CPP` is set to a non-empty value other than 0)."""
    module = _build_module()
    found = module.find_build()
    if found:
        return found
    if build is None:
        build = os.environ.get(BUILD_ENV, "") not in ("", "0")
    if not build:
        raise FileNotFoundError(
            f"No llama.cpp build for this patch under {module.cache_root()}; run `python llama_cpp_patch/build.py` "
            f"or set {BUILD_ENV}=1."
        )
    return module.build()


def tool_path(build_dir: Optional[Path] = None) -> Path:
    """Path of the `llama-doubter` binary."""
    return (build_dir or ensure_llama_cpp_build()) / "build" / "bin" / "llama-doubter"


class _ModelParams(ctypes.Structure):
    """`struct llama_model_params` of the pinned llama.cpp (passed by value, so the layout must match)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LOG_ERROR = 4
_FLOATS = ctypes.POINTER(ctypes.c_float)


def _floats(array: np.ndarray) -> Any:
    return array.ctypes.data_as(_FLOATS)


class LlamaCpp:
    """ctypes bindings to the patched `libllama` (model loading and the stateless Doubter computations)."""

    def __init__(self, build_dir: Optional[Path] = None) -> None:
        bin_dir = (build_dir or ensure_llama_cpp_build()) / "build" / "bin"
        self.lib = lib = ctypes.CDLL(str(bin_dir / "libllama.so"))
        self.errors: list[str] = []
        self._log_callback = _LOG_CALLBACK(self._log)  # kept alive for the library's lifetime
        lib.llama_log_set.argtypes = [_LOG_CALLBACK, ctypes.c_void_p]
        lib.llama_log_set(self._log_callback, None)
        lib.llama_backend_init()

        p, i32, size = ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t
        signatures = {
            "llama_model_default_params": ([], _ModelParams),
            "llama_model_load_from_file": ([ctypes.c_char_p, _ModelParams], p),
            "llama_model_free": ([p], None),
            "llama_doubter_adapter_init": ([p, ctypes.c_char_p], p),
            "llama_doubter_adapter_free": ([p], None),
            "llama_doubter_adapter_n_read": ([p], i32),
            "llama_doubter_adapter_n_inject": ([p], i32),
            "llama_doubter_adapter_inject_layer": ([p, i32], i32),
            "llama_doubter_adapter_n_feat": ([p], i32),
            "llama_doubter_adapter_n_tokens": ([p], i32),
            "llama_doubter_adapter_agc_alpha": ([p, i32], ctypes.c_float),
            "llama_doubter_adapter_read_position": ([p], ctypes.c_int),
            "llama_doubter_adapter_n_signals": ([p], i32),
            "llama_doubter_adapter_encode": ([p, _FLOATS, size, _FLOATS, size, i32], i32),
            "llama_doubter_adapter_encode_answer": ([p, _FLOATS, size, _FLOATS, _FLOATS, i32, _FLOATS, size, i32], i32),
            "llama_doubter_adapter_head_log_odds": ([p, _FLOATS, size, _FLOATS, i32], i32),
            "llama_doubter_adapter_apply_ca": ([p, i32, _FLOATS, size, _FLOATS, i32, ctypes.c_float, _FLOATS, i32],
                                               i32),
            "llama_model_n_embd": ([p], i32),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype

    def _log(self, level: int, text: bytes, _: Any) -> None:
        if level == _LOG_ERROR and text:
            self.errors.append(text.decode(errors="replace").strip())

    def _take_errors(self) -> str:
        message, self.errors = "; ".join(self.errors), []
        return message

    def load_model(self, path: str | os.PathLike) -> Model:
        """Load a base model GGUF (CPU)."""
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        handle = self.lib.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise ValueError(f"llama.cpp failed to load model {path}: {self._take_errors()}")
        return Model(self, handle)


class Model:
    """A loaded base model; free it with `close()` (or use it as a context manager)."""

    def __init__(self, llama: LlamaCpp, handle: int) -> None:
        self.llama, self.handle = llama, handle
        self.n_embd = llama.lib.llama_model_n_embd(handle)

    def load_sidecar(self, path: str | os.PathLike) -> Sidecar:
        """Load a Doubter sidecar for this model; `ValueError` with llama.cpp's message when it is refused."""
        self.llama.errors = []
        handle = self.llama.lib.llama_doubter_adapter_init(self.handle, str(path).encode())
        if not handle:
            raise ValueError(f"llama.cpp refused sidecar {path}: {self.llama._take_errors()}")
        return Sidecar(self, handle)

    def close(self) -> None:
        if self.handle:
            self.llama.lib.llama_model_free(self.handle)
            self.handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sidecar:
    """A loaded Doubter adapter: the encoder and the cross-attention computed by the C++ port (ggml, CPU)."""

    def __init__(self, model: Model, handle: int) -> None:
        lib = model.llama.lib
        self.model, self.handle, self._lib = model, handle, lib
        self.n_read = lib.llama_doubter_adapter_n_read(handle)
        self.n_feat = lib.llama_doubter_adapter_n_feat(handle)
        self.n_tokens = lib.llama_doubter_adapter_n_tokens(handle)
        self.read_position = READ_POSITIONS[lib.llama_doubter_adapter_read_position(handle)]
        self.n_signals = lib.llama_doubter_adapter_n_signals(handle)
        self.inject_layers = [lib.llama_doubter_adapter_inject_layer(handle, i)
                              for i in range(lib.llama_doubter_adapter_n_inject(handle))]

    def agc_alpha(self, step: int) -> float:
        return self._lib.llama_doubter_adapter_agc_alpha(self.handle, step)

    def encode(self, features: np.ndarray, threads: int = 1) -> np.ndarray:
        """Pooled features (R, D_in) -> cognitive tokens (T, H)."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != (self.n_read, self.n_feat):
            raise ValueError(f"features must have shape {(self.n_read, self.n_feat)}, got {features.shape}.")
        tokens = np.empty((self.n_tokens, self.model.n_embd), dtype=np.float32)
        if self._lib.llama_doubter_adapter_encode(self.handle, _floats(features), features.size, _floats(tokens),
                                                  tokens.size, threads):
            raise RuntimeError(f"llama.cpp encoder failed: {self.model.llama._take_errors()}")
        return tokens

    def encode_answer(self, features: np.ndarray, answer_states: np.ndarray, token_signals: np.ndarray,
                      threads: int = 1) -> np.ndarray:
        """An answer reading -> cognitive tokens (T, H): features (R, D_in) at the answer's last token, and every
        answer token's raw read-layer states (L, R, H) and signals (L, S); L may be 0."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        states = np.ascontiguousarray(answer_states, dtype=np.float32)
        signals = np.ascontiguousarray(token_signals, dtype=np.float32)
        n_answer = len(states)
        if (features.shape != (self.n_read, self.n_feat) or states.shape != (n_answer, self.n_read, self.model.n_embd)
                or signals.shape != (n_answer, self.n_signals)):
            raise ValueError(f"features must be {(self.n_read, self.n_feat)}, answer_states (L, {self.n_read}, "
                             f"{self.model.n_embd}) and token_signals (L, {self.n_signals}).")
        tokens = np.empty((self.n_tokens, self.model.n_embd), dtype=np.float32)
        if self._lib.llama_doubter_adapter_encode_answer(self.handle, _floats(features), features.size,
                                                         _floats(states), _floats(signals), n_answer,
                                                         _floats(tokens), tokens.size, threads):
            raise RuntimeError(f"llama.cpp encoder failed: {self.model.llama._take_errors()}")
        return tokens

    def head_log_odds(self, tokens: np.ndarray, threads: int = 1) -> float:
        """A `head` sidecar's confidence log-odds from cognitive tokens (T, H)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.float32)
        if tokens.shape != (self.n_tokens, self.model.n_embd):
            raise ValueError(f"tokens must have shape {(self.n_tokens, self.model.n_embd)}, got {tokens.shape}.")
        log_odds = np.zeros(1, dtype=np.float32)
        if self._lib.llama_doubter_adapter_head_log_odds(self.handle, _floats(tokens), tokens.size, _floats(log_odds),
                                                         threads):
            raise RuntimeError(f"llama.cpp confidence head failed: {self.model.llama._take_errors()}")
        return float(log_odds[0])

    def cross_attention(self, layer: int, hidden: np.ndarray, tokens: np.ndarray, alpha: float = 1.0,
                        threads: int = 1) -> np.ndarray:
        """Inject layer `layer` applied to hidden states (S, H) with cognitive tokens (T, H): h + alpha * CA(h)."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        tokens = np.ascontiguousarray(tokens, dtype=np.float32)
        n_embd = self.model.n_embd
        if hidden.ndim != 2 or hidden.shape[1] != n_embd or tokens.shape != (self.n_tokens, n_embd):
            raise ValueError(f"hidden must be (S, {n_embd}) and tokens {(self.n_tokens, n_embd)}.")
        out = np.empty_like(hidden)
        if self._lib.llama_doubter_adapter_apply_ca(self.handle, layer, _floats(tokens), tokens.size, _floats(hidden),
                                                    hidden.shape[0], alpha, _floats(out), threads):
            raise RuntimeError(f"llama.cpp cross-attention failed: {self.model.llama._take_errors()}")
        return out

    def close(self) -> None:
        if self.handle:
            self._lib.llama_doubter_adapter_free(self.handle)
            self.handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_sidecar(sidecar: Optional[str | os.PathLike]) -> Optional[str]:
    """A sidecar file, downloading `doubter_sidecar.gguf` with `huggingface_hub` when given a Hub repo id."""
    if sidecar is None or Path(sidecar).exists():
        return None if sidecar is None else str(sidecar)
    from .sidecar import download_sidecar

    return str(download_sidecar(str(sidecar)))


def _tool_command(model: str | os.PathLike, sidecar: Optional[str], threads: int, build_dir: Optional[Path]
                  ) -> list[str]:
    cmd = [str(tool_path(build_dir)), "-m", str(model), "-t", str(threads)]
    return cmd + (["--sidecar", sidecar] if sidecar is not None else ["--no-doubter"])


def run_tool(
    model: str | os.PathLike,
    prompt: str,
    sidecar: Optional[str | os.PathLike] = None,
    n_predict: int = 32,
    threads: int = 2,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
    threshold: Optional[float] = None,
    dump_dir: Optional[str | os.PathLike] = None,
    extra_args: Sequence[str] = (),
    build_dir: Optional[Path] = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run `llama-doubter --json` once (plain generation when `sidecar` is None) and return its parsed output: text,
    declined, action, confidence (the decision or head confidence; null for a ratio sidecar), log_odds, n_prompt, n_gen,
    n_refresh, prefix_reuse (pass 2 started at the first inject layer from pass 1's states), tokens and timing (pass1_ms, draft_ms, encode_ms, pass2_prompt_ms, prompt_ms, decode_ms,
    decode_tokens, decode_tok_s). With `threshold` the text is the base's own greedy answer when the confidence
    reaches it and the refusal otherwise. `sidecar` is a file or a Hub repo id (`user/name`, whose
    `doubter_sidecar.gguf` is downloaded with `huggingface_hub`). Raises `RuntimeError` with the tool's stderr on
    failure."""
    cmd = _tool_command(model, _resolve_sidecar(sidecar), threads, build_dir)
    cmd += ["-n", str(n_predict), "--json"]
    for text in stop:
        cmd += ["--stop", text]
    if threshold is not None:
        cmd += ["--threshold", repr(float(threshold))]
    if ignore_eos:
        cmd.append("--ignore-eos")
    if dump_dir is not None:
        cmd += ["--dump-dir", str(dump_dir)]
    cmd += list(extra_args)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as prompt_file:
        prompt_file.write(prompt)  # a file, not -p: a command-line argument holds at most 128 KiB
        prompt_file.flush()
        result = subprocess.run(cmd + ["-f", prompt_file.name], capture_output=True, timeout=timeout, check=False)
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"llama-doubter exited with {result.returncode}: {stderr.strip()[-4000:]}")
    return json.loads(result.stdout.decode(errors="replace").strip().splitlines()[-1])


class LlamaDoubterProcess:
    """`llama-doubter --jsonl`: the base model (and sidecar) loaded once, one request per `generate` call, from any
    thread (requests run in turn). A bad request raises `ValueError` with the tool's message and the process goes
    on; a process that died raises `RuntimeError` with its stderr."""

    def __init__(self, model: str | os.PathLike, sidecar: Optional[str | os.PathLike] = None, threads: int = 2,
                 context: Optional[int] = None, build_dir: Optional[Path] = None) -> None:
        cmd = _tool_command(model, _resolve_sidecar(sidecar), threads, build_dir) + ["--jsonl"]
        if context is not None:
            cmd += ["-c", str(context)]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process; closed by close())
        self._process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                         text=True, encoding="utf-8", bufsize=1)
        self._lock = threading.Lock()
        self._requests = 0
        ready = self._process.stdout.readline()
        if not ready:
            message = self._stopped()
            self._stderr.close()
            raise RuntimeError(message)
        self.info: dict[str, Any] = json.loads(ready)
        """What the tool loaded: mode, n_ctx, confidence_kind and refusal_text."""

    def generate(self, prompt: str, n_predict: int = 64, stop: Sequence[str] = (), threshold: Optional[float] = None,
                 ignore_eos: bool = False) -> dict[str, Any]:
        """The tool's JSON reply for one prompt (the fields of `run_tool`)."""
        request: dict[str, Any] = {"prompt": prompt, "n_predict": n_predict, "stop": list(stop),
                                   "threshold": threshold, "ignore_eos": ignore_eos}
        with self._lock:
            self._requests += 1
            request["id"] = self._requests
            try:
                self._process.stdin.write(json.dumps(request) + "\n")
                self._process.stdin.flush()
                line = self._process.stdout.readline()
            except (BrokenPipeError, OSError, ValueError):
                line = ""
            if not line:
                raise RuntimeError(self._stopped())
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        if reply.get("id") != request["id"]:
            raise RuntimeError(f"llama-doubter answered request {reply.get('id')} to request {request['id']}")
        return reply

    def _stopped(self) -> str:
        try:
            code = self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        self._stderr.seek(0)
        return f"llama-doubter stopped (exit code {code}): {self._stderr.read().decode(errors='replace').strip()[-4000:]}"

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
