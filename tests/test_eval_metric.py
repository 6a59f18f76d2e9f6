"""trainer.eval_metric: validation by a generated metric chooses the kept weights and drives early stopping."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import copy_rows
from safetensors.torch import load_file
from test_resume import signal_at_forward
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tunewright import api
from tunewright.checkpoint import CHECKPOINT_DIR, read_trainer_state
from tunewright.config import EVAL_METRICS, load_config
from tunewright.data import build_examples
from tunewright.errors import ConfigError, RunFolderError
from tunewright.objective import LanguageModelObjective, evaluate_loss
from tunewright.selection import is_better

TEXT = {"input_features": [{"name": "word"}], "output_features": [{"name": "echo"}]}
CATEGORY = {"input_features": [{"name": "word"}], "output_features": [{"name": "echo", "type": "category"}]}


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(raw)
    return str(caught.value)


def test_a_metric_the_output_type_does_not_report_is_refused_with_the_valid_choices() -> None:
    message = config_error({**TEXT, "trainer": {"eval_metric": "accuracy"}})
    assert "trainer.eval_metric: 'accuracy' is not reported for text outputs; choose one of loss, " in message
    assert "exact_match" in message and "\n" not in message
    message = config_error({**CATEGORY, "trainer": {"eval_metric": "bleu"}})
    assert "choose one of loss, accuracy, macro_f1" in message
    assert "'macro_f1'" in config_error({**TEXT, "trainer": {"eval_metric": "f1"}})  # lists every name


def test_eval_max_rows_without_a_generated_metric_is_refused() -> None:
    message = config_error({**TEXT, "trainer": {"eval_max_rows": 10}})
    assert "trainer.eval_max_rows: takes effect only with a generated trainer.eval_metric" in message
    assert load_config({**TEXT, "trainer": {"eval_metric": "exact_match", "eval_max_rows": 10}})


def test_every_metric_has_a_direction() -> None:
    assert {direction for direction, _ in EVAL_METRICS.values()} == {"max", "min"}
    assert is_better(0.5, 0.4, "exact_match") and not is_better(0.4, 0.5, "exact_match")
    assert is_better(0.4, 0.5, "char_error_rate") and is_better(1.0, None, "loss")
    assert not is_better(0.5, 0.5, "exact_match")  # a tie keeps the earlier weights


def test_loss_evaluation_leaves_an_eval_model_in_eval_mode(
    tiny_model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    # evaluate.py scores a loaded model through a fresh objective before it generates: generation
    # must not run with dropout because the wrapper started in training mode.
    tiny_model.eval()
    examples = build_examples([tokenizer("say cat:")["input_ids"]], ["cat"], tokenizer)
    evaluate_loss(LanguageModelObjective(tiny_model), examples, batch_size=2, pad_id=0)
    assert not tiny_model.training


def selection_config(tiny_model_dir: Path, **trainer: object) -> dict:
    """18 training rows in batches of 2 (one forward call per step), 6 validation rows, validated every step.

    With these settings the tiny model's character error rate is best at step 7 while its
    validation loss keeps falling to step 20: the metric and the loss choose different weights.
    """
    return {
        **TEXT,
        "base_model": str(tiny_model_dir),
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "trainer": {"max_steps": 20, "batch_size": 2, "learning_rate": 0.3, "eval_every": 1, "seed": 7,
                    "eval_metric": "char_error_rate", "checkpoint_steps": 1, **trainer},
        "generation": {"max_new_tokens": 4},
        "preprocessing": {"split": [0.75, 0.25, 0.0]},
    }


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_kept_weights_are_the_best_by_the_metric_not_by_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = api.train(selection_config(tiny_model_dir), copy_rows(24), tmp_path / "run", show_progress=False)
    records = log_records(tmp_path / "run")
    best = min(records, key=lambda record: (record["val_char_error_rate"], record["step"]))
    lowest_loss = min(records, key=lambda record: record["val_loss"])
    assert best["step"] != lowest_loss["step"]  # the two criteria differ here
    training, validation = result.metrics["training"], result.metrics["validation"]
    assert training["best_step"] == best["step"] and training["best_eval_metric"] == best["val_char_error_rate"]
    # The kept weights score, after training, what they scored when they were chosen.
    assert validation["char_error_rate"] == pytest.approx(best["val_char_error_rate"])
    assert validation["loss"] == pytest.approx(best["val_loss"])
    assert validation["loss"] > lowest_loss["val_loss"]


def test_the_best_metric_so_far_survives_a_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = selection_config(tiny_model_dir, early_stopping_patience=4)
    straight = api.train(config, copy_rows(24), tmp_path / "straight", show_progress=False)
    stopped_at, best_step = straight.metrics["training"]["steps"], straight.metrics["training"]["best_step"]
    assert straight.metrics["training"]["stopped_early"] and best_step < stopped_at - 1
    # Interrupted in the last step, after the best one: the resumed run must know the best value, its
    # weights and the patience count, or it would stop elsewhere and keep other weights.
    out = tmp_path / "interrupted"
    # One training forward call per step; the step in progress completes, then the checkpoint is saved.
    with signal_at_forward(stopped_at - 1, signal.SIGTERM):
        with pytest.raises(Exception, match="interrupted by SIGTERM"):
            api.train(config, copy_rows(24), out, show_progress=False)
    state = read_trainer_state(sorted((out / CHECKPOINT_DIR).iterdir())[-1])
    assert (state.eval_metric, state.best_step, state.step) == ("char_error_rate", best_step, stopped_at - 1)
    assert state.evals_without_improvement == stopped_at - 1 - best_step
    resumed = api.train(config, copy_rows(24), out, show_progress=False, resume=True)
    for key in ("steps", "best_step", "best_eval_metric", "best_val_loss"):
        assert resumed.metrics["training"][key] == straight.metrics["training"][key], key
    kept = load_file(out / "adapter_model.safetensors")
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert all(torch.equal(kept[name], expected[name]) for name in expected)


def test_a_resume_with_another_eval_metric_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = selection_config(tiny_model_dir, max_steps=4)
    out = tmp_path / "run"
    with signal_at_forward(3, signal.SIGTERM), pytest.raises(Exception, match="interrupted by SIGTERM"):
        api.train(config, copy_rows(24), out, show_progress=False)
    config["trainer"]["eval_metric"] = "exact_match"
    with pytest.raises(RunFolderError, match="chosen by trainer.eval_metric 'char_error_rate', not 'exact_match'"):
        api.train(config, copy_rows(24), out, show_progress=False, resume=True)
