"""`tunewright tune`: Optuna search over the config's tune: section, on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from tunewright import api
from tunewright.cli import app
from tunewright.config import load_config
from tunewright.errors import ConfigError, TrainingError
from tunewright.tune import tune


@pytest.fixture
def search_config(tiny_config: dict) -> dict:
    """Two steps per trial, validated every step, over the learning rate and the rank."""
    return {**tiny_config,
            "trainer": {**tiny_config["trainer"], "max_steps": 2, "eval_every": 1},
            "tune": {"space": {"trainer.learning_rate": {"low": 1e-3, "high": 5e-2, "log": True},
                               "adapter.r": {"choices": [2, 4]}}}}


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]


def test_search_writes_best_config_table_and_plot_and_the_best_config_trains(
        search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    result = tune(search_config, copy_csv, tmp_path / "search", trials=3, show_progress=False)
    folder = tmp_path / "search"
    assert len(finished(result.study)) == 3
    assert (folder / "search.png").stat().st_size > 1000
    page = (folder / "report.html").read_text()
    assert page.count("<svg") == 1 and "Best trial" in page and "trainer.learning_rate" in page
    rows = list(csv.DictReader((folder / "trials.csv").read_text().splitlines()))
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    assert {"state", "trainer.learning_rate", "adapter.r", "value", "seconds"} <= set(rows[0])
    assert min(float(row["value"]) for row in rows) == pytest.approx(result.best_value)  # loss: minimised
    best = yaml.safe_load(result.best_config.read_text())
    assert "tune" not in best
    assert best["trainer"]["learning_rate"] == result.best_params["trainer.learning_rate"]
    assert best["adapter"]["r"] == result.best_params["adapter.r"]
    for number in range(3):
        status = json.loads((folder / "trials" / f"trial-{number:03d}" / "run.json").read_text())
        assert status["status"] == "complete"
    run = api.train(load_config(result.best_config), copy_csv, tmp_path / "best-run", show_progress=False)
    assert json.loads((run.run_dir / "run.json").read_text())["status"] == "complete"


def test_a_stopped_search_resumes_without_rerunning_finished_trials(
        search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    first = tune(search_config, copy_csv, tmp_path / "search", trials=2, show_progress=False)
    first_values = [trial.value for trial in finished(first.study)]
    again = tune(search_config, copy_csv, tmp_path / "search", trials=3, show_progress=False)
    assert len(again.study.trials) == 3  # one new trial
    assert [trial.value for trial in finished(again.study)][:2] == first_values
    assert sorted(path.name for path in (tmp_path / "search" / "trials").iterdir()) == [
        "trial-000", "trial-001", "trial-002"]


def test_a_trial_left_running_is_marked_failed_and_its_values_retried(
        search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    from tunewright.tune import STUDY_FILE, STUDY_NAME

    folder = tmp_path / "search"
    folder.mkdir()
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{folder / STUDY_FILE}")
    stopped = study.ask({"trainer.learning_rate": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True),
                         "adapter.r": optuna.distributions.CategoricalDistribution([2, 4])})
    result = tune(search_config, copy_csv, folder, trials=1, show_progress=False)
    states = [trial.state for trial in result.study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert result.study.trials[1].params == stopped.params


def test_a_pruned_trial_stops_training_and_its_run_is_not_complete(
        search_config: dict, copy_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[int] = []
    original_report = optuna.Trial.report

    def record_report(trial: optuna.Trial, value: float, step: int) -> None:
        reported.append(step)
        original_report(trial, value, step)

    monkeypatch.setattr(optuna.Trial, "report", record_report)
    monkeypatch.setattr(optuna.Trial, "should_prune", lambda trial: len(reported) >= 1)  # prune at the first eval
    folder = tmp_path / "search"
    with pytest.raises(TrainingError, match="no trial completed"):
        tune(search_config, copy_csv, folder, trials=1, show_progress=False)
    study = optuna.load_study(study_name="tunewright", storage=f"sqlite:///{folder / 'study.db'}")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.PRUNED]
    assert reported == [1]  # stopped at the first validation of a two-step run
    status = json.loads((folder / "trials" / "trial-000" / "run.json").read_text())
    assert status["status"] == "failed" and "pruned" in status["error"]
    assert (folder / "trials.csv").read_text().count("PRUNED") == 1


def test_train_ignores_the_tune_section(search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    run = api.train(search_config, copy_csv, tmp_path / "run", show_progress=False)
    assert run.metrics["training"]["steps"] == 2


@pytest.mark.parametrize(("space", "expected"), [
    ({"trainer.learnin_rate": {"low": 1e-4, "high": 1e-2}},
     "tune.space.trainer.learnin_rate: unknown key path (did you mean 'learning_rate'?)"),
    ({"adapter.r": {"low": 8, "high": 4}}, "tune.space.adapter.r: low (8) must be below high (4)"),
    ({"trainer": {"low": 1, "high": 2}}, "tune.space.trainer: names a section"),
    ({"adapter.r": {"low": 1, "high": 4, "choices": [2]}}, "tune.space.adapter.r: give either low and high"),
    ({"adapter.dropout": {"low": 0.0, "high": 1.5}}, "tune.space.adapter.dropout: the value 1.5 is refused"),
    ({"trainer.lr_scheduler": {"choices": ["linear", "sideways"]}},
     "tune.space.trainer.lr_scheduler: the value 'sideways' is refused"),
])
def test_bad_search_spaces_are_one_line_config_errors(
        space: dict, expected: str, tiny_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({**tiny_config, "tune": {"space": space}}))
    result = CliRunner().invoke(app, ["tune", "-c", str(config_path), "-d", str(copy_csv), "--trials", "1",
                                      "-o", str(tmp_path / "search")])
    assert result.exit_code == 7, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "search" / "trials").exists()


def test_a_config_without_tune_section_or_validation_rows_is_refused(tiny_config: dict, copy_csv: Path,
                                                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tune section"):
        tune(tiny_config, copy_csv, tmp_path / "a", trials=1)
    no_validation = {**tiny_config, "preprocessing": {"split": [1.0, 0.0, 0.0]},
                     "tune": {"space": {"adapter.r": {"choices": [2, 4]}}}}
    with pytest.raises(ConfigError, match="needs validation rows"):
        tune(no_validation, copy_csv, tmp_path / "b", trials=1)


def test_cli_prints_the_best_config_path_on_stdout(search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(search_config))
    result = CliRunner().invoke(app, ["tune", "-c", str(config_path), "-d", str(copy_csv), "--trials", "1",
                                      "-o", str(tmp_path / "search"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "search" / "best_config.yaml")


def test_tune_is_a_public_verb() -> None:
    import tunewright

    assert tunewright.tune is tune and "tune" in tunewright.__all__


def test_list_choices_round_trip_and_an_invalid_combination_names_the_searched_keys(tiny_config: dict) -> None:
    from tunewright.config import TuneRange
    from tunewright.tune import decoded_params, encoded, trial_config_for

    space = {"adapter.target_modules": TuneRange(choices=[["q_proj", "v_proj"], "all-linear"]),
             "adapter.r": TuneRange(low=2, high=64)}
    values = {"adapter.target_modules": encoded(["q_proj", "v_proj"]), "adapter.r": 4}
    assert decoded_params(values, space)["adapter.target_modules"] == ["q_proj", "v_proj"]
    assert trial_config_for(tiny_config, space, values).adapter.target_modules == ["q_proj", "v_proj"]
    adalora = {**tiny_config, "adapter": {"type": "adalora", "init_r": 8}}
    with pytest.raises(ConfigError, match=r"^tune.space.adapter.target_modules=.*tune.space.adapter.r=64: the config "
                       r"these values make is invalid \(.*cannot exceed init_r") as refused:
        trial_config_for(adalora, space, {**values, "adapter.r": 64})
    assert "\n" not in str(refused.value)


# ---- several devices: one worker process per device, one shared study ----------------------------------


def test_workers_on_two_devices_share_one_study(search_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    # Two CPU workers stand in for two GPUs: the same processes, only CUDA_VISIBLE_DEVICES differs.
    result = tune(search_config, copy_csv, tmp_path / "search", trials=3, show_progress=False, devices=["cpu", "cpu"])
    folder = tmp_path / "search"
    done = finished(result.study)
    assert 3 <= len(done) <= 4  # workers finishing together may each start one more
    assert {trial.user_attrs["device"] for trial in done} == {"cpu"}
    assert len({tuple(sorted(trial.params.items())) for trial in done}) == len(done)  # no values drawn twice
    logs = sorted(path.name for path in (folder / "workers").iterdir())
    assert logs == ["worker-0-cpu.log", "worker-1-cpu.log"]
    assert all(row["device"] == "cpu" for row in csv.DictReader((folder / "trials.csv").read_text().splitlines())
               if row["state"] == "COMPLETE")
    assert yaml.safe_load(result.best_config.read_text())["adapter"]["r"] == result.best_params["adapter.r"]
    # Asking again for as many finished trials starts no worker trial.
    again = tune(search_config, copy_csv, folder, trials=3, show_progress=False, devices=["cpu", "cpu"])
    assert len(again.study.trials) == len(result.study.trials)


def test_a_failing_worker_names_its_log(search_config: dict, tmp_path: Path) -> None:
    missing = tmp_path / "gone.csv"
    missing.write_text("word,echo\na,a\nb,b\nc,c\nd,d\n")
    folder = tmp_path / "search"
    config = {**search_config, "input_features": [{"name": "absent"}], "prompt": {"template": "say {absent}:"}}
    with pytest.raises(TrainingError, match=r"worker-0-cpu\.log: the worker on cpu failed \(.*absent"):
        tune(config, missing, folder, trials=1, show_progress=False, devices=["cpu"])


def test_devices_are_parsed_or_refused_in_one_line() -> None:
    from tunewright.tune_devices import parse_devices, worker_environment

    assert parse_devices("0, cuda:1,cpu") == ["cuda:0", "cuda:1", "cpu"]
    with pytest.raises(ConfigError, match=r"^--devices: 'gpu0' is not a device"):
        parse_devices("gpu0")
    assert worker_environment("cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert worker_environment("cpu")["CUDA_VISIBLE_DEVICES"] == ""
    result = CliRunner().invoke(app, ["tune", "--config", "c.yaml", "--dataset", "d.csv", "--trials", "1",
                                      "-o", "out", "--devices", "gpu0"])
    assert result.exit_code == 7 and "--devices: 'gpu0' is not a device" in result.output
