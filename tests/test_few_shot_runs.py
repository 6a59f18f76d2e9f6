"""`prompt.few_shot` through the pipeline on a tiny model: training, the saved pool, load, predict, serve, inspect.

What must hold: the pool is the training split only (validation and test rows never enter it), a
training row never gets itself as an example, the same row renders the same prompt in training, in a
loaded run and in the server, and a run folder carries its pool (sealed with the other files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app
from tunewright.config import ServeSettings, load_config
from tunewright.errors import ConfigError, DataError, RunFolderError
from tunewright.few_shot import FEW_SHOT_DIR, POOL_FILE, VECTORS_FILE
from tunewright.serving.app import create_app
from tunewright.serving.pool import load_models

WORDS = ["cat", "dog", "sun", "sea", "owl", "elk", "ant", "bee", "cow", "fox", "hen", "yak"]


def rows() -> pd.DataFrame:
    splits = ["train"] * 8 + ["validation"] * 2 + ["test"] * 2
    return pd.DataFrame({"word": WORDS, "echo": WORDS, "split": splits})


def few_shot_config(base: Path, strategy: str = "random", k: int = 2, **trainer: Any) -> dict[str, Any]:
    return {
        "base_model": str(base),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo"}],
        "prompt": {"template": "say {word}:", "task": "Repeat.", "few_shot": {"k": k, "strategy": strategy}},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"batch_size": 4, "max_steps": 2, **trainer},
        "generation": {"max_new_tokens": 3},
        "preprocessing": {"split_column": "split"},
    }


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tunewright.TrainResult:
    folder = tmp_path_factory.mktemp("few-shot") / "run"
    return tunewright.train(few_shot_config(tiny_model_dir), rows(), folder, show_progress=False)


@pytest.fixture(scope="module")
def random_run(trained: tunewright.TrainResult) -> Path:
    return trained.run_dir


def pool_rows(run: Path) -> list[dict[str, str]]:
    lines = (run / FEW_SHOT_DIR / POOL_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_the_pool_is_the_training_split_only(random_run: Path):
    pool = pool_rows(random_run)
    assert [row["prompt"] for row in pool] == [f"say {word}:" for word in WORDS[:8]]
    assert [row["answer"] for row in pool] == WORDS[:8]


def test_training_prompts_hold_k_examples_after_the_task_and_never_the_row_itself(random_run: Path):
    tuned = tunewright.load(random_run)
    train = rows()[:8]
    for word, prompt in zip(train["word"], tuned.render_frame(train, in_pool=True), strict=True):
        assert prompt.startswith("Repeat.\nsay ") and prompt.endswith(f"\n\nsay {word}:")
        assert prompt.count("say ") == 3  # two examples, then the row
        assert f"say {word}:{word}" not in prompt


def test_a_loaded_run_renders_and_predicts_as_the_trained_model(trained: tunewright.TrainResult):
    held_out = rows()[10:]
    loaded = tunewright.load(trained.run_dir)
    assert loaded.render_frame(held_out) == trained.model.render_frame(held_out)
    assert loaded.predict(held_out)["prediction"].tolist() == trained.model.predict(held_out)["prediction"].tolist()


def test_the_server_renders_the_few_shot_prompt_as_predict(random_run: Path):
    models = load_models([f"shots={random_run}"], [])
    with TestClient(create_app(models, ServeSettings()), base_url="http://localhost") as client:
        response = client.post("/v1/completions", json={"model": "shots", "prompt": "owl", "max_tokens": 3})
        assert response.status_code == 200, response.text
        served = response.json()["choices"][0]["text"]
    predicted = tunewright.predict(random_run, [{"word": "owl"}])["prediction"].iloc[0]
    assert served == predicted


def test_a_changed_pool_file_is_refused_on_load(random_run: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(random_run, copy)
    pool = copy / FEW_SHOT_DIR / POOL_FILE
    pool.write_text(pool.read_text(encoding="utf-8").replace("cat", "CAT"), encoding="utf-8")
    with pytest.raises(RunFolderError, match=r"pool\.jsonl.*changed"):
        tunewright.load(copy)


def test_semantic_saves_the_pool_embeddings_and_load_reads_them(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "semantic"
    result = tunewright.train(few_shot_config(tiny_model_dir, "semantic"), rows(), run, show_progress=False)
    assert (run / FEW_SHOT_DIR / VECTORS_FILE).is_file()
    held_out = rows()[10:]
    expected = result.model.render_frame(held_out)

    def no_pool_embedding(texts: list[str]) -> None:
        raise AssertionError("a loaded run must not embed its pool again")

    monkeypatch.setattr("tunewright.few_shot.cached_embeddings", no_pool_embedding)
    assert tunewright.load(run).render_frame(held_out) == expected


def test_zero_shot_from_config_takes_its_pool_from_the_caller(tiny_model_dir: Path):
    config = few_shot_config(tiny_model_dir)
    config["trainer"] = {"type": "none"}
    with pytest.raises(ConfigError, match=r"prompt\.few_shot: pass the training rows") as error:
        tunewright.from_config(config)
    assert "\n" not in str(error.value)
    tuned = tunewright.from_config(config, few_shot_pool=rows()[:8])
    assert tuned.render_frame(pd.DataFrame({"word": ["owl"]}))[0].count("say ") == 3


def test_too_small_a_training_split_is_one_line_data_error(tiny_model_dir: Path, tmp_path: Path):
    config = few_shot_config(tiny_model_dir, k=8)
    with pytest.raises(DataError, match=r"prompt\.few_shot\.k: the training split has 8 row\(s\)"):
        tunewright.train(config, rows(), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("change", "where"), [
    ({"conversation": {"column": "messages"}}, "prompt.few_shot"),
    ({"trainer": {"type": "dpo"}}, "prompt.few_shot"),
    ({"prompt": {"few_shot": {"k": 0}}}, "prompt.few_shot.k"),
    ({"prompt": {"few_shot": {"strategy": "nearest"}}}, "prompt.few_shot.strategy"),
])
def test_few_shot_misuse_is_a_config_error_at_its_key(tiny_model_dir: Path, change: dict[str, Any], where: str):
    config = few_shot_config(tiny_model_dir)
    config.update(change)
    if "conversation" in change:
        config.pop("input_features")
        config.pop("output_features")
        config["prompt"] = {"few_shot": {"k": 2}}
    if change.get("trainer", {}).get("type") == "dpo":
        config["prompt"] = {"few_shot": {"k": 2}}
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")) as error:
        load_config(config)
    assert "\n" not in str(error.value)


def test_inspect_renders_few_shot_rows_from_the_inspected_data(tiny_model_dir: Path, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(few_shot_config(tiny_model_dir)))
    data = tmp_path / "rows.csv"
    rows()[:8].drop(columns="split").to_csv(data, index=False)
    result = CliRunner().invoke(app, ["inspect", "--config", str(config), "--dataset", str(data), "--rows", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("say ") >= 3


def test_serving_a_few_shot_config_without_a_run_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path):
    config = few_shot_config(tiny_model_dir)
    config["trainer"] = {"type": "none"}
    path = tmp_path / "zero.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"zero\.yaml: prompt\.few_shot needs the training rows") as error:
        load_models([], [path])
    assert "\n" not in str(error.value)
