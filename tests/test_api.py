"""End to end on the tiny model: train -> run folder -> load -> predict / evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_rows

import tunewright
from tunewright.errors import DataError, RunFolderError


@pytest.fixture
def trained_run(tmp_path: Path, tiny_config: dict):
    return tunewright.train(tiny_config, copy_rows(), tmp_path / "run", show_progress=False)


def test_run_folder_has_everything(trained_run) -> None:
    run_dir = trained_run.run_dir
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "metrics.json", "training_log.jsonl", "run.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["trainer"]["gradient_accumulation_steps"] == 1  # defaults are filled in
    log_lines = (run_dir / "training_log.jsonl").read_text().splitlines()
    assert len(log_lines) == trained_run.metrics["training"]["steps"] == 10  # 18 train rows / 4 -> 5 steps x 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["validation"]) >= {"loss", "perplexity", "token_accuracy", "exact_match", "bleu",
                                          "rouge_l", "char_error_rate"}
    assert metrics["training"]["trainable_parameters"] > 0


def test_reloaded_run_predicts_the_same_tokens_every_time(trained_run) -> None:
    rows = copy_rows(8)
    in_memory = tunewright.predict(trained_run.model, rows)["prediction"].tolist()
    loaded = tunewright.load(trained_run.run_dir)
    first = tunewright.predict(loaded, rows)["prediction"].tolist()
    second = tunewright.predict(trained_run.run_dir, rows)["prediction"].tolist()
    assert first == second == in_memory


def test_reloaded_run_gives_identical_logits(trained_run) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = tunewright.load(trained_run.run_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained_run.model.model(ids).logits, rtol=0, atol=0)


def test_predict_and_evaluate_write_files(trained_run, tmp_path: Path) -> None:
    rows = copy_rows(6)
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"predictions{suffix}"
        tunewright.predict(trained_run.run_dir, rows, out)
        written = pd.read_csv(out) if suffix == ".csv" else pd.read_json(out, lines=True)
        assert list(written.columns) == ["word", "echo", "prediction"] and len(written) == 6
    metrics = tunewright.evaluate(trained_run.run_dir, rows, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["rows"] == 6


def test_full_fine_tuning_saves_safetensors(tmp_path: Path, tiny_config: dict) -> None:
    config = {**tiny_config, "adapter": None, "trainer": {"max_steps": 2, "batch_size": 4}}
    run = tunewright.train(config, copy_rows(), tmp_path / "full", show_progress=False)
    assert (run.run_dir / "model.safetensors").is_file() and not (run.run_dir / "adapter_config.json").exists()
    assert run.metrics["training"]["trainable_parameters"] == run.metrics["training"]["total_parameters"]
    rows = copy_rows(4)
    assert tunewright.predict(run.run_dir, rows)["prediction"].tolist() == \
        tunewright.predict(run.model, rows)["prediction"].tolist()


def test_zero_shot_run_has_config_but_no_weights(tmp_path: Path, tiny_config: dict) -> None:
    config = {**tiny_config, "trainer": {"type": "none"}}
    run = tunewright.train(config, copy_rows(), tmp_path / "zero", show_progress=False)
    names = {path.name for path in run.run_dir.iterdir()}
    assert {"config.yaml", "metrics.json", "run.json"} <= names
    assert not names & {"adapter_model.safetensors", "model.safetensors"}
    rows = copy_rows(4)
    from_folder = tunewright.predict(run.run_dir, rows)["prediction"].tolist()
    from_config = tunewright.predict(tunewright.from_config(config), rows)["prediction"].tolist()
    assert from_folder == from_config


def test_incomplete_run_is_refused(trained_run) -> None:
    status_file = trained_run.run_dir / "run.json"
    status_file.write_text(json.dumps({"status": "running"}))
    with pytest.raises(RunFolderError, match="the run is running, not complete"):
        tunewright.load(trained_run.run_dir)


def test_existing_run_folder_is_not_overwritten_silently(trained_run, tiny_config: dict) -> None:
    with pytest.raises(RunFolderError, match="already holds a run; pass --overwrite"):
        tunewright.train(tiny_config, copy_rows(), trained_run.run_dir, show_progress=False)


def test_bad_data_fails_before_any_folder_is_written(tmp_path: Path, tiny_config: dict) -> None:
    with pytest.raises(DataError, match="column 'echo' not found"):
        tunewright.train(tiny_config, copy_rows().drop(columns=["echo"]), tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()


def test_separate_validation_file(tmp_path: Path, tiny_config: dict) -> None:
    run = tunewright.train(tiny_config, copy_rows(16), tmp_path / "run", validation=copy_rows(4),
                           show_progress=False)
    assert run.metrics["validation"]["rows"] == 4
    assert run.metrics["training"]["steps"] == 8  # all 16 rows train: 4 steps x 2 epochs


def test_public_names_are_exported() -> None:
    from tunewright.api import TrainResult
    from tunewright.config import load_config
    from tunewright.errors import TunewrightError
    from tunewright.predictor import TunedModel

    assert {"TunewrightError", "TunedModel", "TrainResult", "load_config", "EvaluationMetrics", "train", "load",
            "from_config", "predict", "evaluate", "export"} <= set(tunewright.__all__)
    assert (tunewright.TunewrightError, tunewright.TunedModel, tunewright.TrainResult, tunewright.load_config) == (
        TunewrightError, TunedModel, TrainResult, load_config)
    assert all(getattr(tunewright, name) is not None for name in tunewright.__all__)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        tunewright.trian  # noqa: B018


def test_the_export_verb_survives_importing_the_export_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    from tunewright import api

    monkeypatch.delitem(sys.modules, "tunewright.export")  # import it afresh, as a first import would
    importlib.import_module("tunewright.export")
    assert tunewright.export is api.export


def test_show_progress_defaults_agree() -> None:
    import inspect

    defaults = {verb.__name__: inspect.signature(verb).parameters["show_progress"].default
                for verb in (tunewright.train, tunewright.predict, tunewright.evaluate)}
    assert defaults == {"train": None, "predict": None, "evaluate": None}  # None: bars when stderr is a terminal


def test_export_takes_a_loaded_model_or_a_run_folder(trained_run, tmp_path: Path) -> None:
    from_model = tunewright.export(tunewright.load(trained_run.run_dir), tmp_path / "adapter")
    assert (from_model / "adapter_config.json").is_file()
    from_folder = tunewright.export(trained_run.run_dir, tmp_path / "merged", merge=True)
    assert (from_folder / "model.safetensors").is_file() and not (from_folder / "adapter_config.json").exists()


def assert_declared(metrics: dict) -> None:
    """Every key evaluate returns is declared in its return type, nested ones included."""
    import typing

    from tunewright.api import ClassMetrics, ConfusionMatrix, EvaluationMetrics

    assert typing.get_type_hints(tunewright.evaluate)["return"] is EvaluationMetrics
    assert set(metrics) <= set(EvaluationMetrics.__annotations__)
    assert EvaluationMetrics.__required_keys__ <= set(metrics)
    for per_class in metrics.get("per_class", {}).values():
        assert set(per_class) == set(ClassMetrics.__annotations__)
    if "confusion_matrix" in metrics:
        assert set(metrics["confusion_matrix"]) == set(ConfusionMatrix.__annotations__)


def test_text_metrics_are_declared_and_counts_are_ints(trained_run, tmp_path: Path) -> None:
    metrics = tunewright.evaluate(trained_run.run_dir, copy_rows(6), tmp_path / "metrics.json")
    assert_declared(metrics)
    assert type(metrics["rows"]) is int and type(trained_run.metrics["validation"]["rows"]) is int
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == 6
    assert "6.0" not in (tmp_path / "metrics.json").read_text()


def test_category_metrics_are_declared_and_counts_are_ints(tiny_config: dict) -> None:
    labels = ["cat", "dog", "sun", "sea", "red", "owl", "fig", "ink"]
    config = {**tiny_config, "output_features": [{"name": "echo", "type": "category", "labels": labels}],
              "trainer": {"type": "none"}}
    metrics = tunewright.evaluate(tunewright.from_config(config), copy_rows(8))
    assert_declared(metrics)
    assert type(metrics["rows"]) is int and type(metrics["unseen_label_rows"]) is int
    assert all(type(entry["support"]) is int for entry in metrics["per_class"].values())
    assert all(type(count) is int for row in metrics["confusion_matrix"]["matrix"] for count in row)


@pytest.mark.parametrize(("verb", "arguments"), [
    (tunewright.predict, {"output": "out.txt"}),
    (tunewright.evaluate, {"output": "metrics.csv"}),
    (tunewright.evaluate, {"predictions_output": "predictions.txt"}),
])
def test_output_file_types_are_checked_before_loading(tmp_path: Path, verb, arguments: dict) -> None:
    # The run folder does not exist: a check made after loading would raise RunFolderError instead.
    with pytest.raises(DataError, match="unknown output type '.(txt|csv)'; use "):
        verb(tmp_path / "no-run", copy_rows(2), **arguments)
