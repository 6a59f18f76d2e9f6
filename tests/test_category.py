"""Category outputs end to end on the tiny model: train -> run folder -> load -> predict / evaluate."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app
from tunewright.errors import ConfigError, DataError
from tunewright.heads import encode_labels, score_labels, score_labels_flat

WORDS = {"sun": "warm", "fire": "warm", "tea": "warm", "ice": "cold", "snow": "cold", "frost": "cold"}


def label_rows(count: int = 18) -> pd.DataFrame:
    words = list(WORDS)
    return pd.DataFrame(
        {
            "word": [words[i % len(words)] for i in range(count)],
            "label": [WORDS[words[i % len(words)]] for i in range(count)],
        }
    )


def category_config(tiny_config: dict, decoder: str, **trainer: object) -> dict:
    config = {**tiny_config, "output_features": [{"name": "label", "type": "category", "decoder": decoder}]}
    config["prompt"] = {"template": "{word} feels"}
    config["trainer"] = {**tiny_config["trainer"], "epochs": 1, **trainer}
    config["preprocessing"] = {"split": [0.67, 0.33, 0.0]}
    return config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("decoder", ["classifier", "label_scoring"])
def test_train_save_load_gives_identical_predictions(tiny_config, tmp_path, decoder, precision):
    # bf16 training holds the frozen weights in bf16; the model it returns must be the fp32 one again.
    result = tunewright.train(
        category_config(tiny_config, decoder, precision=precision), label_rows(), tmp_path / "run",
        show_progress=False,
    )
    run_dir = result.run_dir
    assert json.loads((run_dir / "labels.json").read_text()) == ["cold", "warm"]
    assert (run_dir / "head.safetensors").is_file() == (decoder == "classifier")
    assert (run_dir / "confusion_matrix_validation.png").stat().st_size > 0
    validation = result.metrics["validation"]
    assert validation["loss"] > 0 and 0 <= validation["accuracy"] <= 1  # a real loss, never zeros
    log_lines = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert all(line["loss"] > 0 for line in log_lines)

    before = tunewright.predict(result.model, label_rows(), all_probabilities=True)
    after = tunewright.predict(tunewright.load(run_dir), label_rows(), all_probabilities=True)
    pd.testing.assert_frame_equal(before, after)
    assert set(before["prediction"]) <= {"cold", "warm"}
    assert list(before.columns[-3:]) == ["prediction_probability", "probability_cold", "probability_warm"]
    total = before["probability_cold"] + before["probability_warm"]
    assert total.round(5).eq(1).all()
    assert (
        before["prediction_probability"] == before[["probability_cold", "probability_warm"]].max(axis=1)
    ).all()


def test_classifier_learns_a_separable_task(tiny_config, tmp_path):
    config = category_config(tiny_config, "classifier", epochs=6, learning_rate=0.02)
    # The q/v adapter this high rate was chosen for: every linear layer at 0.02 overshoots the tiny model.
    config["adapter"] = {**config["adapter"], "target_modules": ["q_proj", "v_proj"]}
    config["preprocessing"] = {"split": [1.0, 0.0, 0.0]}
    result = tunewright.train(config, label_rows(24), tmp_path / "run", show_progress=False)
    metrics = tunewright.evaluate(result.model, label_rows(24))
    assert metrics["accuracy"] == 1.0


def test_zero_shot_label_scoring_takes_labels_from_the_data(tiny_config, tmp_path):
    result = tunewright.train(
        category_config(tiny_config, "label_scoring", type="none"),
        label_rows(),
        tmp_path / "run",
        show_progress=False,
    )
    assert result.model.labels == ["cold", "warm"]
    assert "loss" in result.metrics["validation"]
    predictions = tunewright.predict(tunewright.load(result.run_dir), label_rows(4))
    assert predictions["prediction_probability"].between(0.5, 1).all()


def test_evaluate_writes_json_and_png_and_counts_unseen_labels(tiny_config, tmp_path, caplog):
    config = category_config(tiny_config, "label_scoring", type="none")
    config["output_features"][0]["labels"] = ["cold", "warm"]
    model = tunewright.from_config(config)
    rows = pd.DataFrame({"word": ["sun", "ice", "mud", "fog"], "label": ["warm", "cold", "wet", "wet"]})
    with caplog.at_level(logging.WARNING):
        metrics = tunewright.evaluate(model, rows, output=tmp_path / "eval.json")
    assert "2 of 4 row(s) have label(s) the model was not trained on ('wet' x2)" in caplog.text
    assert metrics["unseen_label_rows"] == 2
    assert metrics["accuracy"] <= 0.5  # the unseen rows are errors
    assert metrics["confusion_matrix"]["labels"] == ["cold", "warm", "wet"]
    assert json.loads((tmp_path / "eval.json").read_text())["unseen_label_rows"] == 2
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_single_class_fails_before_loading_a_model(tiny_config, tmp_path):
    rows = label_rows().assign(label="warm")
    with pytest.raises(DataError, match="column 'label' has a single class \\('warm'\\)"):
        tunewright.train(category_config(tiny_config, "classifier"), rows, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_blank_labels_are_a_data_error(tiny_config, tmp_path):
    rows = label_rows()
    rows.loc[3, "label"] = "   "
    with pytest.raises(DataError, match="empty label"):
        tunewright.train(category_config(tiny_config, "label_scoring"), rows, tmp_path / "run")


def test_training_labels_outside_the_configured_set_are_a_data_error(tiny_config, tmp_path):
    config = category_config(tiny_config, "label_scoring")
    config["output_features"][0]["labels"] = ["warm", "hot"]
    with pytest.raises(DataError, match="'cold'.*not in output_features\\[0\\]\\.labels"):
        tunewright.train(config, label_rows(), tmp_path / "run")


def test_config_label_errors(tiny_config):
    config = category_config(tiny_config, "label_scoring")
    with pytest.raises(ConfigError, match="output_features\\[0\\]: labels must be non-empty"):
        tunewright.from_config(
            {**config, "output_features": [{"name": "label", "type": "category", "labels": ["a", ""]}]}
        )
    with pytest.raises(ConfigError, match="output_features\\[0\\]\\.labels: a category model used straight"):
        tunewright.from_config(config)


def test_cli_predict_all_probabilities_and_evaluate(tiny_config, tmp_path):
    result = tunewright.train(
        category_config(tiny_config, "classifier"), label_rows(), tmp_path / "run", show_progress=False
    )
    data = tmp_path / "rows.csv"
    label_rows(6).to_csv(data, index=False)
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "--quiet",
            "predict",
            "-m",
            str(result.run_dir),
            "-d",
            str(data),
            "-o",
            str(tmp_path / "p.csv"),
            "--all-probabilities",
        ],
    )
    assert out.exit_code == 0, out.output
    written = pd.read_csv(tmp_path / "p.csv")
    assert {"prediction", "prediction_probability", "probability_cold", "probability_warm"} <= set(
        written.columns
    )
    out = runner.invoke(
        app,
        ["--quiet", "evaluate", "-m", str(result.run_dir), "-d", str(data), "-o", str(tmp_path / "m.json")],
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "m.png").is_file()
    assert "accuracy" in json.loads((tmp_path / "m.json").read_text())


@pytest.mark.integration
def test_real_model_label_scoring_on_sst2():
    """smollm2-135m zero-shot on SST-2 rows: cached scoring equals flat scoring; metrics are sane."""
    if not (SHARED_DATA / "sst2" / "test.csv").is_file():
        pytest.skip("../shared/data/sst2 is not available")
    rows = pd.read_csv(SHARED_DATA / "sst2" / "test.csv").sample(n=24, random_state=0)
    config = {
        "input_features": [{"name": "text"}],
        "output_features": [{"name": "label", "type": "category", "labels": ["negative", "positive"]}],
        "prompt": {"task": "Is this movie review positive or negative?",
                   "template": "Review: {text}\nSentiment:"},
        "trainer": {"type": "none", "eval_batch_size": 8},
    }
    model = tunewright.from_config(config)
    prompt_ids = model.encode_frame(rows.iloc[:4])
    label_ids = encode_labels(model.tokenizer, ["negative", "positive", "not sure"])
    pad_id = model.tokenizer.pad_token_id
    cached = score_labels(model.model, prompt_ids, label_ids, pad_id, "sum")
    flat = score_labels_flat(model.model, prompt_ids, label_ids, pad_id)
    assert torch.allclose(cached, flat, atol=1e-3)
    metrics = tunewright.evaluate(model, rows)
    assert 0 < metrics["loss"] < 5 and metrics["rows"] == 24
    assert sum(sum(row) for row in metrics["confusion_matrix"]["matrix"]) == 24


# ---- contextual calibration --------------------------------------------------------------------------


def test_calibration_divides_by_the_prior_and_renormalises() -> None:
    from tunewright.heads import calibrate, mean_prior

    log_probs = torch.tensor([[0.7, 0.3], [0.9, 0.1]]).log()
    uniform = torch.tensor([0.5, 0.5]).log()
    assert torch.allclose(calibrate(log_probs, uniform), log_probs, atol=1e-6)
    # A prompt that leans 80/20 toward the first label: 0.7/0.8 vs 0.3/0.2 now favours the second.
    calibrated = calibrate(log_probs, torch.tensor([0.8, 0.2]).log()).exp()
    assert calibrated[0].argmax() == 1 and calibrated[1].argmax() == 0
    assert torch.allclose(calibrated.sum(dim=-1), torch.ones(2))
    prior = mean_prior(torch.tensor([[0.6, 0.4], [1.0, 0.0]]).clamp_min(1e-12).log()).exp()
    assert torch.allclose(prior, torch.tensor([0.8, 0.2]), atol=1e-6)


def test_content_free_calibration_applies_to_predictions_and_is_refused_elsewhere(tiny_config) -> None:
    from tunewright.heads import CONTENT_FREE_INPUTS, calibrate

    config = category_config(tiny_config, "label_scoring", type="none")
    config["output_features"][0]["labels"] = ["cold", "warm"]
    plain = tunewright.from_config(config)
    config["output_features"][0]["calibration"] = "content_free"
    calibrated = tunewright.from_config(config)
    rows = label_rows(6)
    ids = plain.encode_frame(rows)
    empty = plain.encode_frame(pd.DataFrame({"word": list(CONTENT_FREE_INPUTS)}))
    prior = torch.logsumexp(plain.label_log_probs(empty), dim=0) - torch.log(torch.tensor(3.0))
    expected = calibrate(plain.label_log_probs(ids), prior)
    assert torch.allclose(calibrated.label_log_probs(ids), expected, atol=1e-5)
    predicted = tunewright.predict(calibrated, rows, all_probabilities=True)
    assert predicted["probability_cold"].tolist() == pytest.approx(expected.exp()[:, 0].tolist(), abs=1e-5)
    for output in ({"name": "label", "type": "text"}, {"name": "label", "type": "category", "decoder": "classifier"}):
        bad = {**config, "output_features": [{**output, "calibration": "content_free"}]}
        with pytest.raises(ConfigError, match=r"output_features\[0\]\.calibration"):
            tunewright.load_config(bad)
