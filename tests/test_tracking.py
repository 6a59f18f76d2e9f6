"""The `tracking:` section: TensorBoard and MLflow files in the run folder, read back with the tools' own readers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import train_tiny_run
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tunewright import api, tracking
from tunewright.errors import ConfigError

STEP_METRICS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_mib"}


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps with a validation after each, logged to TensorBoard and to MLflow's default store."""
    run = train_tiny_run(
        tiny_model_dir, tmp_path_factory.mktemp("tracked") / "run", {"max_steps": 2, "eval_every": 1},
        rows_repeat=2, preprocessing={"split": [0.5, 0.5, 0.0]},
        tracking={"tensorboard": True, "mlflow": {"experiment": "tiny"}},
    )
    assert not mlflow.is_tracking_uri_set()  # the run's store was MLflow's setting only while it trained
    return run


@pytest.fixture
def mlflow_store(tracked_run: Path) -> Iterator[str]:
    uri = f"sqlite:///{tracked_run / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri("")


def test_tensorboard_events_are_in_the_run_folder_and_read_back(tracked_run: Path) -> None:
    events = EventAccumulator(str(tracked_run / "tensorboard" / "tiny"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert STEP_METRICS | {"validation/loss", "validation/token_accuracy", "final/validation/exact_match"} <= scalars
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    assert [event.step for event in events.Scalars("validation/loss")] == [1, 2]
    assert all(event.value > 0 for event in events.Scalars("train/peak_memory_mib"))


def test_the_mlflow_run_reads_back_with_search_runs(tracked_run: Path, mlflow_store: str) -> None:
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "run"
    assert run["params.trainer.max_steps"] == "2" and run["params.trainer.eval_metric"] == "loss"
    assert int(run["params.parameters.trainable"]) > 0 and run["params.hardware.device"] == "cpu"
    assert {f"metrics.{name}" for name in STEP_METRICS} <= set(runs.columns)
    history = MlflowClient().get_metric_history(run["run_id"], "validation/loss")
    assert [metric.step for metric in history] == [1, 2]


def test_a_tracked_run_folder_loads_and_its_tracker_files_are_not_sealed(tracked_run: Path) -> None:
    assert api.load(tracked_run).config.tracking.tensorboard
    (tracked_run / "mlflow" / "mlflow.db").touch()  # opening the store in MLflow's UI may write to it
    api.load(tracked_run)


def test_a_missing_library_is_a_one_line_config_error(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "mlflow" else real_find_spec(name))
    with pytest.raises(ConfigError) as caught:
        train_tiny_run(tiny_model_dir, tmp_path / "run", {"max_steps": 1}, tracking={"mlflow": {}})
    message = str(caught.value)
    assert message == ("tracking.mlflow: the mlflow package is not installed; pip install 'tunewright[tracking]', "
                       "or remove tracking.mlflow")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_records_map_to_tracker_names() -> None:
    record = {"step": 3, "epoch": 0, "loss": 1.5, "skipped": True, "val_exact_match": 0.25, "note": "x"}
    assert tracking.tracked_values(record) == {"train/epoch": 0, "train/loss": 1.5, "validation/exact_match": 0.25}
    flat = tracking.flat_values({"trainer": {"seed": 1, "eval_every": None}, "labels": ["a", "b"]})
    assert flat == {"trainer.seed": 1, "trainer.eval_every": "null", "labels": '["a", "b"]'}
