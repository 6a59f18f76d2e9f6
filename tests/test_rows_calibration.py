"""calibration: rows: the labels' prior from the training split's inputs, saved with the run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_category import category_config, label_rows

import tunewright
from tunewright.data import CALIBRATION_ROWS
from tunewright.errors import ConfigError, DataError, RunFolderError
from tunewright.heads import PRIOR_FILE, calibrate, mean_prior


def rows_config(tiny_config: dict, **trainer: object) -> dict:
    config = category_config(tiny_config, "label_scoring", **trainer)
    config["output_features"][0]["calibration"] = "rows"
    config["preprocessing"] = {"split": [1.0, 0.0, 0.0]}
    return config


def test_zero_shot_run_divides_by_the_training_inputs_prior_and_saves_it(tiny_config, tmp_path) -> None:
    train = label_rows(24)
    result = tunewright.train(rows_config(tiny_config, type="none"), train, tmp_path / "run", show_progress=False)
    plain_config = {**result.model.config.model_dump(), "output_features": [
        {"name": "label", "type": "category", "labels": ["cold", "warm"]}]}
    plain = tunewright.from_config(plain_config)
    # Every training input (fewer than CALIBRATION_ROWS), labels unused: the mean label distribution.
    prior = mean_prior(plain.label_log_probs(plain.encode_frame(train[["word"]])))
    saved = json.loads((result.run_dir / PRIOR_FILE).read_text())["log_prior"]
    assert saved == pytest.approx(prior.tolist(), abs=1e-5)

    rows = label_rows(6)
    expected = calibrate(plain.label_log_probs(plain.encode_frame(rows)), prior).exp()
    loaded = tunewright.load(result.run_dir)
    predicted = tunewright.predict(loaded, rows, all_probabilities=True)
    assert predicted["probability_cold"].tolist() == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    assert torch.allclose(loaded.label_prior, prior, atol=1e-5)


def test_fine_tuned_run_estimates_the_prior_with_the_weights_it_keeps(tiny_config, tmp_path) -> None:
    config = rows_config(tiny_config, max_steps=3)
    config["preprocessing"] = {"split": [0.7, 0.3, 0.0]}
    result = tunewright.train(config, label_rows(30), tmp_path / "run", show_progress=False)
    assert "accuracy" in result.metrics["validation"]
    sample = result.model.calibration_inputs
    assert sample is not None and list(sample.columns) == ["word"] and len(sample) == 21
    fresh = mean_prior(result.model.uncalibrated_label_log_probs(result.model.encode_frame(sample)))
    saved = torch.tensor(json.loads((result.run_dir / PRIOR_FILE).read_text())["log_prior"])
    assert torch.allclose(saved, fresh, atol=1e-5)


def test_the_sample_is_capped_seeded_and_label_free(tiny_config) -> None:
    from tunewright.config import load_config
    from tunewright.data import calibration_sample

    config = load_config(rows_config(tiny_config, type="none"))
    train = pd.DataFrame({"word": [f"w{i}" for i in range(CALIBRATION_ROWS + 50)], "label": "cold"})
    first, second = calibration_sample(train, config), calibration_sample(train, config)
    assert first is not None and len(first) == CALIBRATION_ROWS and list(first.columns) == ["word"]
    pd.testing.assert_frame_equal(first, second)
    with pytest.raises(DataError, match=r"calibration: rows needs training rows"):
        calibration_sample(train.head(0), config)
    plain = load_config(category_config(tiny_config, "label_scoring", type="none"))
    assert calibration_sample(train, plain) is None


def test_without_training_rows_it_is_refused_with_one_line(tiny_config, tmp_path) -> None:
    config = rows_config(tiny_config, type="none")
    config["output_features"][0]["labels"] = ["cold", "warm"]
    with pytest.raises(ConfigError, match=r"^output_features\[0\]\.calibration: rows .* train the config"):
        tunewright.from_config(config)
    bad = {**config, "output_features": [{"name": "label", "type": "category", "decoder": "classifier",
                                          "calibration": "rows"}]}
    with pytest.raises(ConfigError, match=r"output_features\[0\]\.calibration"):
        tunewright.load_config(bad)


def test_a_missing_or_broken_prior_file_names_the_run(tiny_config, tmp_path) -> None:
    result = tunewright.train(rows_config(tiny_config, type="none"), label_rows(12), tmp_path / "run",
                              show_progress=False)
    from tunewright.run import seal_run

    prior = result.run_dir / PRIOR_FILE
    # Each edit resealed, as after a deliberate change: the prior's own checks must speak.
    prior.write_text("[1, 2", encoding="utf-8")
    seal_run(result.run_dir)
    with pytest.raises(RunFolderError, match=r"label_prior\.json: not a label prior"):
        tunewright.load(result.run_dir)
    prior.write_text(json.dumps({"log_prior": [0.0, 0.0, 0.0]}), encoding="utf-8")
    seal_run(result.run_dir)
    with pytest.raises(RunFolderError, match=r"3 label priors for 2 labels"):
        tunewright.load(result.run_dir)
    prior.unlink()
    seal_run(result.run_dir)
    with pytest.raises(RunFolderError, match=r"without label_prior\.json"):
        tunewright.load(result.run_dir)


def saved_calibration(run_dir) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["output_features"][0]["calibration"]


def test_auto_is_rows_for_zero_shot_runs_and_none_for_fine_tuned_ones(tiny_config, tmp_path) -> None:
    config = category_config(tiny_config, "label_scoring", type="none")
    config["preprocessing"] = {"split": [1.0, 0.0, 0.0]}
    zero_shot = tunewright.train(config, label_rows(12), tmp_path / "zero", show_progress=False)
    assert saved_calibration(zero_shot.run_dir) == "rows" and (zero_shot.run_dir / PRIOR_FILE).is_file()
    assert tunewright.load(zero_shot.run_dir).label_prior is not None

    tuned = tunewright.train({**config, "trainer": {**config["trainer"], "type": "finetune", "max_steps": 1}},
                             label_rows(12), tmp_path / "tuned", show_progress=False)
    assert saved_calibration(tuned.run_dir) == "none" and not (tuned.run_dir / PRIOR_FILE).exists()
    # The classifier scores no labels: auto stays, and the saved config loads again.
    classifier = category_config(tiny_config, "classifier", max_steps=1)
    run = tunewright.train(classifier, label_rows(12), tmp_path / "classifier", show_progress=False).run_dir
    assert saved_calibration(run) == "auto"
    tunewright.load_config(run / "config.yaml")


def test_auto_without_training_rows_is_uncalibrated(tiny_config) -> None:
    from tunewright.config import load_config
    from tunewright.data import resolve_calibration

    config = load_config(category_config(tiny_config, "label_scoring", type="none"))
    assert resolve_calibration(config, label_rows(0)).output_feature.calibration == "none"
    assert resolve_calibration(config, label_rows(4)).output_feature.calibration == "rows"
    # Straight from a config there are no training rows: auto scores as none does.
    labelled = category_config(tiny_config, "label_scoring", type="none")
    labelled["output_features"][0]["labels"] = ["cold", "warm"]
    auto = tunewright.from_config(labelled)
    plain = tunewright.from_config({**labelled, "output_features": [{**labelled["output_features"][0],
                                                                      "calibration": "none"}]})
    ids = plain.encode_frame(label_rows(6))
    assert torch.allclose(auto.label_log_probs(ids), plain.label_log_probs(ids))
