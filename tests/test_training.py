"""The collect -> train -> eval pipeline on a tiny local model: cache, resumption, targets, trainer, CLI, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import tiny_models
import tiny_run
import torch
import yaml
from peft import get_peft_model
from safetensors.torch import load_file

from peft_doubter import DoubterConfig, cli
from peft_doubter.cli.options import apply_recipe, given
from peft_doubter.data.collection import CollectConfig, load_cache
from peft_doubter.data.prompts import LETTERS, PromptConfig
from peft_doubter.data.sequences import tokenize_example
from peft_doubter.evaluation.confidence import doubter_log_odds, sigmoid
from peft_doubter.evaluation.metrics import auroc
from peft_doubter.evaluation.protocol import EvalConfig
from peft_doubter.evaluation.report import EvaluationReport
from peft_doubter.names import CHECKPOINTS_DIR, PREFIX_STATES_DIR, SIDECAR_FILE
from peft_doubter.runs import stages
from peft_doubter.runs.ask import ask
from peft_doubter.runs.manifest import build_doubter_config, read_manifest
from peft_doubter.training.config import DoubterSFTConfig
from peft_doubter.training.targets import choose_target
from peft_doubter.training.trainer import DoubterTrainer, is_fast_parameter, pretrain_projectors


DOUBTER = tiny_run.DOUBTER_SETTINGS
PROMPT = PromptConfig(**tiny_run.PROMPT_SETTINGS)


def collect_config(model_dir: Path, dataset: Path, **overrides) -> CollectConfig:
    return CollectConfig(**tiny_run.collect_settings(model_dir, dataset, **overrides))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model and a QA file on which the model's own greedy answer is gold for about half the questions."""
    return tiny_run.make_workspace(tmp_path_factory.mktemp("pipeline"))


def test_cache_holds_answers_correctness_and_pass1_features(workspace):
    cache = load_cache(workspace["run"] / "cache")
    manifest = read_manifest(workspace["run"])
    assert len(cache) == 60 and set(cache["split"]) == {"train", "val", "test"}
    assert 0.3 < sum(cache["correct"]) / len(cache) < 0.7
    assert manifest["read_layers"] == [1, 2, 3] and manifest["cache_summary"]["test"]["questions"] > 0
    row = cache[0]
    assert torch.as_tensor(row["features"]).shape == (3, 64)
    model, tokenizer, _ = stages.load_run_model(workspace["run"], adapter=False)
    inputs = tokenizer(row["prompt"], return_tensors="pt")
    features = model.base_model.run_pass1(inputs["input_ids"], inputs["attention_mask"],
                                          torch.tensor([inputs["input_ids"].shape[1] - 1])).stacked()
    torch.testing.assert_close(torch.as_tensor(row["features"]), features[0], rtol=0, atol=1e-5)
    assert row["correct"] == (row["pass1_answer"] in row["answers"])


def test_interrupted_collection_resumes_and_foreign_cache_is_refused(workspace, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    kept = (run_dir / "cache" / "shard-00000").stat().st_mtime_ns
    shutil.rmtree(run_dir / "cache" / "shard-00002")
    resumed = stages.collect_run(run_dir, collect_config(workspace["model"], workspace["dataset"]), PROMPT, DOUBTER)
    assert len(resumed) == 60
    assert (run_dir / "cache" / "shard-00000").stat().st_mtime_ns == kept, "finished shards are not recomputed"
    assert resumed["id"] == load_cache(workspace["run"] / "cache")["id"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    config = collect_config(workspace["model"], workspace["dataset"])
    for collect_changes, doubter_changes, message in (
            ({}, {"target_layers": [2, 3]}, r"other settings \(doubter.target_layers: \[1, 2, 3\] -> \[2, 3\]\)"),
            ({"limit": 30}, {}, r"collect.limit: None -> 30"),
            ({"val_fraction": 0.2}, {}, r"collect.val_fraction: 0.1 -> 0.2"),
            ({"model": str(tiny_run.save_tiny_model(tmp_path / "other", family="qwen2"))}, {}, r"collect.model")):
        with pytest.raises(ValueError, match=message):
            stages.collect_run(run_dir, dataclasses.replace(config, **collect_changes), PROMPT,
                               {**DOUBTER, **doubter_changes})
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert after == {p: v for p, v in before.items() if not p.name.endswith(".lock")}, "a refusal changes nothing"
    (run_dir / "run.json").unlink()  # without the manifest, the cache itself refuses to be mixed
    with pytest.raises(ValueError, match="activation cache .* different read_layers"):
        stages.collect_run(run_dir, config, PROMPT, {**DOUBTER, "target_layers": [2, 3]})
    with pytest.raises(ValueError, match="activation cache .* different sample"):
        stages.collect_run(run_dir, dataclasses.replace(config, shard_size=8), PROMPT, DOUBTER)


def test_answer_read_position_caches_what_generation_reads(workspace, tmp_path):
    """With read_position='answer' the cache holds the states at the end of the base's own answer, exactly what
    two-pass generation reads after drafting; the cache and the trained run are tied to that choice."""
    from peft_doubter.data.collection import stop_token_ids

    answer_mode = {**DOUBTER, "read_position": "answer", "max_draft_tokens": 3}
    run_dir = tmp_path / "answer"
    cache = stages.collect_run(run_dir, collect_config(workspace["model"], workspace["dataset"]), PROMPT, answer_mode)
    prompt_cache = load_cache(workspace["run"] / "cache")
    model, tokenizer, _ = stages.load_run_model(run_dir, adapter=False)
    doubter = model.base_model
    for index in (0, 1, 2):
        row = cache[index]
        assert row["pass1_answer"] == prompt_cache[index]["pass1_answer"]
        inputs = tokenizer(row["prompt"], return_tensors="pt")
        draft = doubter.draft(inputs["input_ids"], inputs["attention_mask"], 3,
                              eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(draft.tokens[0]).strip() == row["pass1_answer"] and draft.tokens[0] == row["answer_ids"]
        read = doubter.read_answers(inputs["input_ids"], inputs["attention_mask"], draft.tokens).stacked()
        torch.testing.assert_close(torch.as_tensor(row["features"]), read[0], rtol=0, atol=1e-5)
        states = torch.as_tensor(row["answer_states"]).float()
        assert states.shape[0] == len(draft.tokens[0])
        torch.testing.assert_close(states, draft.reading.answer_states[0, :len(draft.tokens[0])], rtol=1e-3,
                                   atol=1e-3)  # float16 in the cache
        if row["pass1_answer"]:
            moved = torch.as_tensor(row["features"]) - torch.as_tensor(prompt_cache[index]["features"])
            assert moved.abs().max() > 1e-3
    manifest = (run_dir / "run.json").read_text()
    with pytest.raises(ValueError, match="doubter.read_position: 'answer' -> 'prompt'"):
        stages.collect_run(run_dir, collect_config(workspace["model"], workspace["dataset"]), PROMPT, DOUBTER)
    assert (run_dir / "run.json").read_text() == manifest, "a refused collection leaves the manifest alone"
    with pytest.raises(ValueError, match="fixed at collection"):
        stages.train_run(run_dir, {}, {"read_position": "prompt"})
    with pytest.raises(ValueError, match="different read_position"):  # cross-domain questions read elsewhere
        stages._eval_questions(run_dir, read_manifest(run_dir), EvalConfig(questions_from=str(workspace["run"])))


def test_features_captured_during_generation_equal_pass1():
    model = get_peft_model(tiny_models.build("gemma3"), DoubterConfig(**DOUBTER, pooling="last_mean"))
    ids = torch.randint(3, tiny_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with model.disable_adapter(), model.base_model.capturing_prompt(mask) as capture:
        model.base_model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    expected = model.base_model.run_pass1(ids, mask, torch.full((2,), 8), position_ids=(mask.cumsum(-1) - 1)
                                          .clamp_min(0)).stacked()
    torch.testing.assert_close(capture.stacked(), expected, rtol=0, atol=1e-5)


def test_an_empty_answer_is_read_as_no_answer_tokens():
    """A draft that ends at once (an empty answer) has no answer tokens: its row reads none (mask all false) and the
    attentive encoder scores it from the layer tokens and the pooling's null key, beside longer answers."""
    from peft_doubter.data.sequences import cached_reading
    from peft_doubter.names import TOKEN_SIGNALS

    rng = np.random.default_rng(0)
    rows = [{"features": rng.normal(size=(3, 64)).astype(np.float32),
             "answer_states": rng.normal(size=(length, 3, 64)).astype(np.float16),
             "token_signals": rng.normal(size=(length, len(TOKEN_SIGNALS))).astype(np.float32)} for length in (0, 2)]
    reading = cached_reading(rows)
    assert reading.answer_mask.tolist() == [[False, False], [True, True]]
    assert float(reading.answer_states[0].abs().sum()) == 0.0
    encoder = get_peft_model(tiny_models.build("llama"), DoubterConfig(
        target_layers=[1, 2, 3], encoder_bottleneck_dim=32, ca_bottleneck_dim=32, answer_tokens=2)
    ).base_model.doubter_encoder["default"]
    with torch.no_grad():
        assert torch.isfinite(encoder.confidence_log_odds(encoder(reading))).all()


def test_targets_confirm_refuse_and_correct():
    config = DoubterConfig(enable_self_correction=True, correction_ratio=0.5)
    right = {"id": "a", "correct": True, "pass1_answer": "Paris", "answers": ["Paris, France"], "choices": [],
             "label": -1}
    assert choose_target(right, config, "letter") == ("Paris", "confirm")
    wrong = [{**right, "id": f"q{i}", "correct": False, "pass1_answer": "Lyon"} for i in range(200)]
    actions = [choose_target(row, config, "letter")[1] for row in wrong]
    assert 0.35 < actions.count("correct") / 200 < 0.65 and set(actions) == {"correct", "refuse"}
    assert choose_target(wrong[0], config, "letter") == choose_target(wrong[0], config, "letter")
    corrected = next(choose_target(row, config, "letter")[0] for row in wrong
                     if choose_target(row, config, "letter")[1] == "correct")
    assert corrected == "Wait, the correct answer is Paris, France."
    mcq = {**right, "correct": False, "choices": ["red", "blue"], "label": 1, "pass1_answer": "A"}
    assert choose_target(mcq, DoubterConfig(), "letter") == (DoubterConfig().refusal_text, "refuse")
    assert choose_target({**mcq, "correct": True}, DoubterConfig(), "cloze") == ("blue", "confirm")
    row = tokenize_example(tiny_run.tiny_tokenizer(), "Q: w1 w2 \n A:", "w5 w6", chat=False)
    prompt_len = row["labels"].count(-100)
    assert row["input_ids"][prompt_len:] == row["labels"][prompt_len:]
    assert row["input_ids"][prompt_len:prompt_len + 2] == tiny_run.tiny_tokenizer()("w5 w6")["input_ids"]


def test_probe_pretraining_learns_the_correctness_signal():
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**DOUBTER))
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(200, generator=generator) < 0.4
    features = torch.randn(200, 3, 64, generator=generator)
    features[:, 1, 0] += 3.0 * correct  # only read layer 1 carries the signal
    encoder = model.base_model.doubter_encoder["default"]
    before = [p.detach().clone() for p in encoder.projectors[1].parameters()]
    losses = pretrain_projectors(model.base_model, features, correct, epochs=40, learning_rate=1e-2)
    assert losses[1] < 0.5 * losses[0], "the layer with the signal separates the classes, the others cannot"
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.projectors[1].parameters()))


def test_gates_and_token_preferences_get_the_faster_learning_rate(tmp_path):
    model = get_peft_model(tiny_models.build("llama"), DoubterConfig(**DOUBTER))
    fast = sorted(n.rsplit(".", 2)[-1] for n, p in model.named_parameters() if p.requires_grad and
                  is_fast_parameter(n))
    assert fast == ["gate"] * 3 + ["gates"] + ["token_preference"] * 3
    rows = datasets.Dataset.from_list([{"input_ids": [4, 8, 9], "labels": [-100, 8, 9]}])
    trainer = DoubterTrainer(model, DoubterSFTConfig(output_dir=str(tmp_path), gate_lr_multiplier=5.0),
                             train_dataset=rows, eval_dataset=rows, processing_class=tiny_run.tiny_tokenizer())
    groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in groups] == [2e-4, 1e-3] and len(groups[1]["params"]) == 7


def test_training_lowers_the_loss_and_interrupted_training_resumes(workspace, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    args = {"num_train_epochs": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "probe_epochs": 2,
                "learning_rate": 2e-3, "logging_steps": 1, "early_stopping_patience": None, "save_total_limit": None}

    class Interrupt(Exception):
        pass

    from transformers import TrainerCallback

    class StopAfterFirstEpoch(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Interrupt

    original = DoubterTrainer.__init__

    def with_interrupt(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(StopAfterFirstEpoch())

    DoubterTrainer.__init__ = with_interrupt
    try:
        with pytest.raises(Interrupt):
            stages.train_run(run_dir, args)
    finally:
        DoubterTrainer.__init__ = original
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] and not (run_dir / "adapter").exists()
    with pytest.raises(ValueError, match="started with other options.*num_train_epochs: started with 3, given 6"):
        stages.train_run(run_dir, {**args, "num_train_epochs": 6})
    trainer = stages.train_run(run_dir)  # resumed without repeating the options: the run that was started goes on
    manifest = read_manifest(run_dir)
    steps_per_epoch = -(-manifest["train"]["train_questions"] // 4)
    assert manifest["train"]["resumed_from"].endswith(f"checkpoint-{steps_per_epoch}")
    assert trainer.state.global_step == 3 * steps_per_epoch
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    losses = [entry["loss"] for entry in manifest["train"]["log_history"] if "loss" in entry]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_cli_quickstart_eval_and_ask(workspace, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    code = cli.main(["quickstart", "--run-dir", str(run_dir), "--model", str(workspace["model"]), "--dataset",
                     str(workspace["dataset"]), "--limit", "none", "--k-shot", "0", "--max-new-tokens", "3",
                     "--target-layers", "1,2,3", "--encoder-bottleneck-dim", "32", "--ca-bottleneck-dim", "32",
                     "--shard-size", "16", "--num-train-epochs", "1", "--probe-epochs", "1",
                     "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                     "--read-position", "prompt", "--encoder-type", "selective", "--confidence", "decision",
                     "--text-behaviour", "two-pass", "--n-resamples", "50", "--output-name", "quick"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| doubter |" in out and "| probe |" in out and "| p_min_token |" in out and "Risk control" in out
    assert "[answered]" in out or "[declined]" in out, "the examples come from the report quickstart just wrote"
    report = json.loads((run_dir / "quick" / "report.json").read_text())
    assert report["meta"]["n"] == read_manifest(run_dir)["cache_summary"]["test"]["questions"]
    assert (run_dir / "quick" / "risk_coverage.png").stat().st_size > 0
    main_target = read_manifest(run_dir)["evaluations"]["quick"]["target_risk"]
    targets = [entry["target_risk"] for entry in report["risk_control"]]
    assert targets[0] == pytest.approx(main_target) and len(targets) > 1, "main target first, then the sweep"
    assert set(report["scores"]) == set(report["methods"])
    assert len(report["scores"]["doubter"]["scores"]) == report["meta"]["n"]
    stored = EvaluationReport.from_json(run_dir / "quick" / "report.json")
    for name, reported in report["methods"].items():  # every reported number comes back from the stored scores
        again = stored.recomputed(name)
        for key in ("auroc", "aurc", "sel_acc@20", "sel_acc@50", "ece", "brier"):
            assert again[key] == pytest.approx(reported[key], abs=1e-12, nan_ok=True), (name, key)
    assert read_manifest(run_dir)["train"]["args"]["train_injection"] is True
    assert cli.main(["eval", "--run-dir", str(run_dir), "--text-behaviour", "none", "--n-resamples", "20"]) == 0
    ranking = json.loads((run_dir / "eval" / "report.json").read_text())
    assert "examples" not in ranking["meta"] and "doubter" in capsys.readouterr().out
    assert set(ranking["methods"]) == set(report["methods"])
    assert ranking["scores"]["doubter"]["scores"] == pytest.approx(report["scores"]["doubter"]["scores"], abs=1e-5), \
        "quickstart's in-memory adapter scores as the saved one loaded by `eval`"
    assert cli.main(["ask", "--run-dir", str(run_dir), "w12", "w13"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["ask", "--run-dir", str(run_dir), "--threshold", "calibrated", "w12", "w13"]) == 0
    assert "confidence" in capsys.readouterr().out
    assert cli.main(["ask", "--run-dir", str(run_dir), "--threshold", "high", "w12"]) == 2
    assert "--threshold must be a number or 'calibrated'" in capsys.readouterr().err

    # Thresholded `ask` answers with the base's own answer iff the Doubter's confidence — the number the evaluation
    # ranks and calibrates — reaches the threshold.
    model, tokenizer, manifest = stages.load_run_model(run_dir)
    rows = [row for row in load_cache(run_dir / "cache") if row["split"] == "test"][:3]
    refusal = model.peft_config[model.active_adapter].refusal_text
    expected = sigmoid(doubter_log_odds(model, tokenizer, rows, refusal, "letter", False, 1))
    tokens = manifest["collect"]["max_new_tokens"]
    for row, confidence in zip(rows, expected):
        asked = ask(run_dir, row["question"], tokens, model, tokenizer, threshold=0.0)
        assert asked.confidence == pytest.approx(float(confidence), abs=1e-5)
        assert asked.text == row["pass1_answer"] and not asked.declined
        declined = ask(run_dir, row["question"], tokens, model, tokenizer, threshold=float(confidence) + 1e-3)
        assert declined.declined and declined.text == refusal

def test_cli_quickstart_with_the_defaults_is_the_head_only_doubter(workspace, tmp_path, capsys):
    """Without Doubter options quickstart builds the default Doubter (answer reading, attentive encoder, its
    confidence head fit on its own, no LM stage), reports its thresholded text, and `ask` without --threshold answers
    at the calibrated threshold, with the confidence."""
    run_dir = tmp_path / "run"
    code = cli.main(["quickstart", "--run-dir", str(run_dir), "--model", str(workspace["model"]), "--dataset",
                     str(workspace["dataset"]), "--limit", "none", "--k-shot", "0", "--max-new-tokens", "3",
                     "--target-layers", "1,2,3", "--encoder-bottleneck-dim", "32", "--ca-bottleneck-dim", "32",
                     "--shard-size", "16", "--head-epochs", "2", "--n-resamples", "20"])
    out = capsys.readouterr().out
    assert code == 0
    assert "What the thresholded Doubter wrote" in out
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter["read_position"], adapter["encoder_type"], adapter["confidence"]) == ("answer", "attentive", "head")
    train = read_manifest(run_dir)["train"]
    assert train["args"]["fit_confidence_head"] is True and train["args"]["train_injection"] is False
    assert train["metrics"]["head_fit_val_auroc"] is not None and not list((run_dir / CHECKPOINTS_DIR).glob("*"))
    assert cli.main(["ask", "--run-dir", str(run_dir), "w12", "w13"]) == 0
    default = capsys.readouterr().out
    assert cli.main(["ask", "--run-dir", str(run_dir), "--threshold", "calibrated", "w12", "w13"]) == 0
    assert default == capsys.readouterr().out and "confidence" in default


def test_cli_errors_are_clear_and_lose_nothing(workspace, tmp_path, capsys):
    assert cli.main(["train", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "run `peft-doubter collect --run-dir" in capsys.readouterr().err
    assert cli.main(["collect", "--run-dir", str(tmp_path / "x"), "--dataset", "squad2"]) == 2
    assert "Unknown dataset 'squad2'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["collect", "--run-dir", str(tmp_path / "y"), "--model", str(workspace["model"]),
                     "--dataset", str(empty)]) == 2
    assert "error" in capsys.readouterr().err
    bad_column = tmp_path / "bad.jsonl"
    bad_column.write_text(json.dumps({"prompt": "w1", "answer": "w2"}) + "\n")
    assert cli.main(["collect", "--run-dir", str(tmp_path / "z"), "--model", str(workspace["model"]),
                     "--dataset", str(bad_column)]) == 2
    assert "'question' not found" in capsys.readouterr().err
    assert cli.main(["eval", "--run-dir", str(workspace["run"])]) == 2
    assert "no trained adapter" in capsys.readouterr().err
    assert (workspace["run"] / "cache" / "shard-00000").exists()


def test_training_script_under_accelerate_launch_with_two_cpu_processes(workspace, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    script = Path(__file__).resolve().parents[1] / "trainers" / "train.py"
    # `--cpu` would start a single process; torchrun's launcher (`--multi_gpu`) + `use_cpu` gives 2 gloo processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               "--run_dir", str(run_dir), "--use_cpu", "true", "--stages", "train", "--target_layers", "1,2,3",
               "--encoder_bottleneck_dim", "32", "--ca_bottleneck_dim", "32", "--num_train_epochs", "1",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--probe_epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(run_dir)
    steps = -(-manifest["train"]["train_questions"] // 8)  # 2 processes x 4 rows per step: the data is split
    assert manifest["train"]["metrics"]["epoch"] == 1.0
    assert any(entry.get("step") == steps for entry in manifest["train"]["log_history"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "trainers" / "recipes").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_recipes_parse_into_valid_configs(recipe, tmp_path):
    """Every recipe's options exist and build valid configs (a typo or a bad combination fails here, not after a
    collection)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_train_script", recipe.parents[1] / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parser = script.build_parser()
    apply_recipe(parser, recipe)
    args = parser.parse_args(["--run-dir", str(tmp_path / "run")])
    options = {dest.split(".", 1)[-1] for dest in vars(args)}
    assert set(yaml.safe_load(recipe.read_text())) <= options, "every recipe key is an option"
    build_doubter_config(given(args, "doubter", parser))
    CollectConfig(**given(args, "collect", parser))
    PromptConfig(**given(args, "prompt", parser))
    EvalConfig(**given(args, "eval", parser))
    DoubterSFTConfig(output_dir=str(tmp_path / "out"), **given(args, "train", parser))


def test_train_refuses_a_run_whose_manifest_names_another_base(workspace, tmp_path):
    """run.json edited to name model B while the cache was made on model A: nothing is trained or overwritten."""
    from peft_doubter.tuner import backbone

    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    other = tiny_run.save_tiny_model(tmp_path / "other", seed=5)
    manifest = read_manifest(run_dir)
    manifest["collect"]["model"] = str(other)
    manifest["base_fingerprint"] = backbone.fingerprint(tiny_models.build("llama", seed=5))
    (run_dir / "run.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    with pytest.raises(ValueError, match="cache/manifest.json was made on another base model"):
        stages.train_run(run_dir, {"num_train_epochs": 1})
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert after == before and not (run_dir / "adapter").exists()


def test_a_second_process_on_a_run_directory_is_refused(workspace, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    code = (f"import time; from filelock import FileLock; lock = FileLock({str(run_dir / '.lock')!r}); "
            "lock.acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="Another process is working on"):
            stages.collect_run(run_dir, collect_config(workspace["model"], workspace["dataset"]), PROMPT, DOUBTER)
        with pytest.raises(RuntimeError, match="Another process is working on"):
            stages.train_run(run_dir, {"num_train_epochs": 1})
    finally:
        holder.kill()
        holder.wait()
    assert not list((run_dir / "cache").glob(".shard-*.partial"))


def test_a_read_only_run_directory_is_refused_before_any_work(workspace, tmp_path, monkeypatch):
    import peft_doubter.paths

    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing could be written")

    monkeypatch.setattr(stages, "load_run_model", no_work)
    monkeypatch.setattr(peft_doubter.paths.os, "access", lambda path, mode: not str(path).startswith(str(run_dir)))
    with pytest.raises(PermissionError, match="is not writable: nothing was computed"):
        stages.eval_run(run_dir, EvalConfig())
    with pytest.raises(PermissionError, match="is not writable"):
        stages.train_run(run_dir, {})


def test_damaged_manifests_name_the_file(workspace, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    text = (run_dir / "cache" / "manifest.json").read_text()
    (run_dir / "cache" / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="cache/manifest.json is damaged"):
        stages.collect_run(run_dir, collect_config(workspace["model"], workspace["dataset"]), PROMPT, DOUBTER)
    (run_dir / "run.json").write_text('{"collect": ')
    with pytest.raises(ValueError, match="run.json is damaged"):
        stages.train_run(run_dir, {})


def test_user_data_errors_name_the_file_and_line(tmp_path):
    from peft_doubter.data.benchmarks import load_user_dataset

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "a?", "answer": "x"}\n{"question": "b?", "answer": "y"}\n{"question": "c?",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not a JSON object"):
        load_user_dataset(bad_json)
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes('{"question": "a?", "answer": "x"}\n{"question": "caf\u00e9?", "answer": "y"}\n'
                         .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text"):
        load_user_dataset(not_utf8)
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                for q, a in [("a?", "x"), ("b?", "y"), ("A ?", "x"), ("c?", "z")]))
    with pytest.warns(UserWarning, match="1 rows repeat an earlier question with the same answer and were dropped"):
        assert load_user_dataset(repeated)["question"] == ["a?", "b?", "c?"]
    contradicting = tmp_path / "contradicting.jsonl"
    contradicting.write_text(json.dumps({"question": "a?", "answer": "x"}) + "\n"
                             + json.dumps({"question": "a?", "answer": "w"}) + "\n")
    with pytest.raises(ValueError, match="rows 0 and 1 ask the same question .* with different answers"):
        load_user_dataset(contradicting)


def test_ask_refuses_a_threshold_outside_zero_to_one(workspace, capsys):
    for text in ("nan", "1.5", "-0.1"):
        assert cli.main(["ask", "--run-dir", str(workspace["run"]), "--threshold", text, "w12"]) == 2
        assert "--threshold is a confidence in [0, 1]" in capsys.readouterr().err


def test_fitted_confidence_head_is_frozen_through_the_lm_stage(workspace, tmp_path):
    """`fit_confidence_head`: the encoder and head are fit on the confidence alone (epoch chosen on validation
    AUROC), then frozen: the LM stage trains the injection only and checkpoints on eval loss, and the saved adapter
    scores the validation questions with exactly the fitted AUROC. Without confidence='head' it is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    args = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
            "early_stopping_patience": None, "fit_confidence_head": True, "head_epochs": 3}
    with pytest.raises(ValueError, match="build the Doubter with confidence='head'"):
        stages.train_run(run_dir, args, {"confidence": "decision"})
    shutil.rmtree(run_dir)
    shutil.copytree(workspace["run"], run_dir)
    trainer = stages.train_run(run_dir, args, {"confidence": "head"})
    fit = trainer.head_fit
    assert len(fit.val_aurocs) == 3 and fit.val_auroc == max(fit.val_aurocs) == fit.val_aurocs[fit.epoch - 1]
    assert trainer.args.metric_for_best_model == "loss" and not trainer.args.greater_is_better
    encoder = trainer.model.base_model.doubter_encoder["default"]
    assert not any(p.requires_grad for p in encoder.parameters())
    injected = [p for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert injected and all("doubter_encoder" not in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    history = read_manifest(run_dir)["train"]["log_history"]
    assert history[0]["head_fit_val_auroc"] == fit.val_auroc and history[0]["head_fit_epoch"] == fit.epoch

    model, tokenizer, _ = stages.load_run_model(run_dir)
    val = [row for row in load_cache(run_dir / "cache") if row["split"] == "val"]
    refusal = model.peft_config[model.active_adapter].refusal_text
    scores = doubter_log_odds(model, tokenizer, val, refusal, "letter", False, 4)
    assert auroc([row["correct"] for row in val], scores) == pytest.approx(fit.val_auroc, abs=1e-9)


def test_head_only_doubter_fits_the_head_and_writes_the_thresholded_answer(workspace, tmp_path):
    """A head Doubter's default training (`fit_confidence_head` on, `train_injection` off): training ends after the
    head's fit (no LM step, no checkpoint, no lower-layer cache; the injection keeps its identity start). Its
    evaluation reports the thresholded text by default, which is the base's own answer exactly where the confidence
    reaches the calibrated threshold; two-pass text is refused for it."""
    with pytest.raises(ValueError, match="set `fit_confidence_head=True`"):
        DoubterSFTConfig(output_dir=str(tmp_path / "x"), fit_confidence_head=False, train_injection=False)
    with pytest.raises(ValueError, match="set `fit_confidence_head=True`"):
        DoubterSFTConfig(output_dir=str(tmp_path / "x"), fit_confidence_head=False,
                         train_injection=False).resolve_stages("head")
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    args = {"head_epochs": 3}
    trainer = stages.train_run(run_dir, args, {"confidence": "head"})
    assert trainer.args.fit_confidence_head and not trainer.args.train_injection
    assert trainer.state.global_step == 0 and not list((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"))
    assert not (run_dir / PREFIX_STATES_DIR).exists()
    train = read_manifest(run_dir)["train"]
    assert train["args"]["fit_confidence_head"] is True and train["args"]["train_injection"] is False
    assert train["metrics"]["head_fit_val_auroc"] == trainer.head_fit.val_auroc
    assert train["log_history"][0]["head_fit_epoch"] == trainer.head_fit.epoch
    model, _, _ = stages.load_run_model(run_dir)
    up = [p for n, p in model.named_parameters() if "doubter_ca" in n and "up_proj" in n]
    assert up and all(float(p.abs().max()) == 0.0 for p in up), "the injection keeps its identity start (up = 0)"
    again_dir = tmp_path / "again"
    shutil.copytree(workspace["run"], again_dir)
    torch.manual_seed(12345)  # whatever the global random state, the seed decides the adapter's start
    stages.train_run(again_dir, args, {"confidence": "head"})
    again = load_file(again_dir / "adapter" / "adapter_model.safetensors")
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved), "reproducible"

    with pytest.raises(ValueError, match="--text-behaviour thresholded"):
        stages.eval_run(run_dir, EvalConfig(n_resamples=20, text_behaviour="two-pass"))
    report = stages.eval_run(run_dir, EvalConfig(n_resamples=20))
    threshold = read_manifest(run_dir)["evaluations"]["eval"]["threshold"]
    confidence = np.asarray(report.scores["doubter"]["confidence"])
    test = [row for row in load_cache(run_dir / "cache") if row["split"] == "test"]
    answered = [a == "answered" for a in report.scores["doubter"]["action"]]
    assert answered == (confidence >= threshold).tolist()
    written = report.meta["written"]
    assert [w["text"] for w, a, row in zip(written, answered, test) if a] == [
        row["pass1_answer"] if not row["choices"] else LETTERS[row["pass1_choice"]]
        for a, row in zip(answered, test) if a]
    assert all(w["text"] == model.peft_config["default"].refusal_text for w, a in zip(written, answered) if not a)
    assert report.scores["doubter"]["written_correct"] == [a and bool(row["correct"])
                                                           for a, row in zip(answered, test)]
    behaviour = report.text_behaviour["doubter"]
    assert behaviour["coverage"] == pytest.approx(report.risk_control[0]["test"]["coverage"])
    assert "What the thresholded Doubter wrote" in report.to_markdown()


def test_head_confidence_trains_scores_from_pass_one_and_exports(workspace, tmp_path):
    """`confidence='head'`: a linear unit on the cognitive tokens, trained by the confidence loss (it gets a gradient
    and checkpoints are chosen on its validation AUROC); scoring needs pass 1's reading only, `ask` thresholds the
    same number, and the exported sidecar computes the same number."""
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    args = {"num_train_epochs": 2, "per_device_train_batch_size": 4, "probe_epochs": 1, "learning_rate": 2e-3,
            "early_stopping_patience": None, "fit_confidence_head": False}  # trained jointly with the LM loss
    trainer = stages.train_run(run_dir, args, {"confidence": "head"})
    encoder = trainer.model.base_model.doubter_encoder["default"]
    assert encoder.confidence_head is not None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    assert encoder.confidence_head.weight.grad.abs().sum() > 0, "the confidence loss reaches the head"
    history = read_manifest(run_dir)["train"]["log_history"]
    assert any("eval_auroc" in entry for entry in history), "checkpoints are chosen on the head's AUROC"

    model, tokenizer, manifest = stages.load_run_model(run_dir)
    assert model.peft_config[model.active_adapter].confidence == "head"
    rows = [row for row in load_cache(run_dir / "cache") if row["split"] == "test"][:3]
    refusal = model.peft_config[model.active_adapter].refusal_text
    scores = doubter_log_odds(model, tokenizer, rows, refusal, "letter", False, 2)
    from peft_doubter.data.sequences import cached_reading

    loaded = model.base_model.doubter_encoder["default"]
    with torch.no_grad():
        direct = loaded.confidence_log_odds(loaded(cached_reading(rows))).double().numpy()
        trained = encoder.confidence_log_odds(encoder(cached_reading(rows))).double().numpy()
    assert scores == pytest.approx(direct, abs=1e-6) and direct == pytest.approx(trained, abs=1e-5)
    asked = ask(run_dir, rows[0]["question"], manifest["collect"]["max_new_tokens"], model, tokenizer, threshold=0.0)
    assert asked.confidence == pytest.approx(float(sigmoid(scores[:1])[0]), abs=1e-5)
    from peft_doubter.deploy import numpy_reference
    from peft_doubter.deploy.sidecar import read_sidecar

    weights, meta = read_sidecar(stages.export_run(run_dir))  # the sidecar holds the head: llama.cpp scores it too
    exported = [numpy_reference.head_log_odds(weights, numpy_reference.encode(weights, meta,
                                                                              np.asarray(row["features"])))
                for row in rows]
    assert meta["confidence"] == "head" and exported == pytest.approx(direct, abs=1e-4)


def test_multiple_choice_answer_reading_reads_the_chosen_option(workspace, tmp_path):
    """With read_position='answer' a cloze question's answer is the base's chosen option: the cache holds that
    option's tokens, their read-layer states and teacher-forced signals (their mean log-probability is the option's
    cloze score), and the attentive encoder also reads the distribution over the options (rows without options
    read as before); the confidence head fits and scores on it."""
    import random

    from peft_doubter.data.prompts import cloze_option_ids
    from peft_doubter.data.sequences import cached_reading
    from peft_doubter.names import TOKEN_SIGNALS

    rng = random.Random(3)
    path = tmp_path / "mc.jsonl"
    with open(path, "w") as handle:
        for _ in range(120):
            question = " ".join(f"w{rng.randrange(10, 100)}" for _ in range(4))
            options = [" ".join(f"w{rng.randrange(100, 140)}" for _ in range(rng.randrange(1, 4))) for _ in range(3)]
            handle.write(json.dumps({"question": question, "answer": "", "choices": options,
                                     "label": rng.randrange(3)}) + "\n")
    settings = {**DOUBTER, "read_position": "answer", "encoder_type": "attentive", "answer_tokens": 2,
                "max_draft_tokens": 4, "confidence": "head"}
    run_dir = tmp_path / "run"
    cloze = dataclasses.replace(PROMPT, mc_format="cloze")
    cache = stages.collect_run(run_dir, collect_config(workspace["model"], path, choices_column="choices",
                                                       label_column="label"), cloze, settings)
    model, tokenizer, _ = stages.load_run_model(run_dir, adapter=False)
    rows = [cache[index] for index in range(4)]
    logprob = TOKEN_SIGNALS.index("logprob")
    for row in rows:
        chosen = cloze_option_ids(tokenizer, row["prompt"], [row["choices"][row["pass1_choice"]]])[0]
        assert row["answer_ids"] == chosen and row["pass1_answer"] == row["choices"][row["pass1_choice"]]
        signals = np.asarray(row["token_signals"])
        assert signals.shape == (len(chosen), len(TOKEN_SIGNALS))
        assert signals[:, logprob].mean() == pytest.approx(row["option_logprobs"][row["pass1_choice"]], abs=1e-4)
        inputs = tokenizer(row["prompt"], return_tensors="pt")
        reading = model.base_model.read_given_answers(inputs["input_ids"], inputs["attention_mask"], [chosen])
        torch.testing.assert_close(torch.as_tensor(row["features"]), reading.features[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.as_tensor(row["answer_states"]).float(), reading.answer_states[0],
                                   rtol=1e-3, atol=1e-3)  # float16 in the cache

    reading = cached_reading(rows)
    scores = np.asarray(rows[0]["option_logprobs"], dtype=np.float64)
    expected = np.sort(scores - np.logaddexp.reduce(scores))[::-1]
    assert reading.choice_signals[0, logprob] == pytest.approx(expected[0], abs=1e-5)
    assert reading.choice_signals[0, 2:2 + len(expected)].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert reading.choice_signals[0, 2 + len(expected):].tolist() == [-50.0] * (4 - len(expected))
    encoder = get_peft_model(tiny_models.build("llama"), DoubterConfig(**settings)).base_model.doubter_encoder[
        "default"]
    with torch.no_grad():
        torch.nn.init.normal_(encoder.answer_pooling.null, std=0.5)
        with_options = encoder.confidence_log_odds(encoder(reading))
        without = encoder.confidence_log_odds(encoder(dataclasses.replace(reading, choice_signals=None)))
        reading.choice_signals[0] = float("nan")  # a row without options in the same batch reads as before
        mixed = encoder.confidence_log_odds(encoder(reading))
    assert (with_options - without).abs().min() > 1e-6
    assert mixed[0] == pytest.approx(float(without[0]), abs=1e-6) and torch.equal(mixed[1:], with_options[1:])

    trainer = stages.train_run(run_dir, {"fit_confidence_head": True, "train_injection": True, "head_epochs": 2,
                                         "num_train_epochs": 1, "per_device_train_batch_size": 8}, {})
    assert trainer.head_fit.val_auroc is not None and trainer.state.global_step > 0, "the LM stage reads options too"
    with pytest.raises(ValueError, match="drafts an open answer, while the Doubter read the chosen option"):
        stages.eval_run(run_dir, EvalConfig(n_resamples=20, text_behaviour="two-pass"))
    report = stages.eval_run(run_dir, EvalConfig(n_resamples=20, text_behaviour="thresholded"))
    test = [row for row in load_cache(run_dir / "cache") if row["split"] == "test"]
    assert len(report.scores["doubter"]["confidence"]) == len(test)
    assert "option_msp" in report.scores
    with pytest.raises(ValueError, match="multiple-choice questions has no llama.cpp implementation"):
        stages.export_run(run_dir)  # llama.cpp drafts open answers and reads no option scores
    assert not (run_dir / SIDECAR_FILE).exists()


def test_a_run_collects_several_sources_and_counts_each(workspace, tmp_path):
    """`--dataset a,b` samples and splits the sources as one; run.json's `data_sources` counts each source's
    questions per split (adding up to the splits) with the base's accuracy; mixing open-ended and multiple-choice
    sources, or naming a source twice, is refused before any work."""
    first = tiny_run.write_questions(tmp_path / "first.jsonl", count=30, seed=1)
    second = tiny_run.write_questions(tmp_path / "second.jsonl", count=20, seed=2)
    run_dir = tmp_path / "run"
    cache = stages.collect_run(run_dir, collect_config(workspace["model"], f"{first},{second}"), PROMPT, DOUBTER)
    manifest = read_manifest(run_dir)
    sources = {entry["dataset"]: entry for entry in manifest["data_sources"]}
    assert set(sources) == {str(first), str(second)}
    assert sum(sum(entry["questions"].values()) for entry in sources.values()) == len(cache) == 50
    for split in ("train", "val", "test"):
        assert sum(entry["questions"].get(split, 0) for entry in sources.values()) == \
            manifest["cache_summary"][split]["questions"]
    assert all(0 < sources[str(path)]["questions"]["train"] for path in (first, second)), "both sources are sampled"
    right = sum(entry["base_accuracy"]["test"] * entry["questions"]["test"] for entry in sources.values()
                if "test" in entry["questions"])
    assert right == pytest.approx(sum(row["correct"] for row in cache if row["split"] == "test"))

    with pytest.raises(ValueError, match=r"mixes open-ended sources \(.*first.jsonl\) and multiple-choice "
                                         r"sources \(sciq\)"):
        stages.collect_run(tmp_path / "mixed", collect_config(workspace["model"], f"{first},sciq"), PROMPT, DOUBTER)
    with pytest.raises(ValueError, match="must name each source once"):
        stages.collect_run(tmp_path / "twice", collect_config(workspace["model"], f"{first},{first}"), PROMPT,
                           DOUBTER)
    assert not (tmp_path / "mixed" / "run.json").exists() and not (tmp_path / "mixed" / "cache").exists()
