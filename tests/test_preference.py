"""Preference tuning (DPO, ORPO, SimPO, KTO) on the tiny stack: formulas, data rules, runs, cache, resume.

TRL agreement lives in tests/test_preference_trl.py.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from test_resume import signal_at_forward
from typer.testing import CliRunner

from tunewright import api
from tunewright.cli import app
from tunewright.config import validate_config
from tunewright.errors import ConfigError, DataError
from tunewright.preference_data import DataCounts, build_preference_examples, fit_pair, preference_frame
from tunewright.preference_loss import dpo_losses, simpo_losses
from tunewright.preference_objective import PreferenceObjective
from tunewright.reference_cache import CACHE_DIR

WORDS = ["cat", "dog", "sun", "sea", "red", "owl", "fig", "ink"]


def pair_rows(repeat: int = 2) -> list[dict[str, str]]:
    return [{"prompt": f"say {w}:", "chosen": f" {w}", "rejected": f" {w[::-1]}!"} for w in WORDS * repeat]


def preference_config(base: Path, kind: str = "dpo", **sections: dict) -> dict:
    trainer_section = {"type": kind, "epochs": 2, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32",
                       **sections.pop("trainer", {})}
    return {"base_model": str(base), "input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "trainer": trainer_section,
            "generation": {"max_new_tokens": 3}, "preprocessing": {"split": [0.75, 0.25, 0.0]}, **sections}


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]


# --- formulas ---------------------------------------------------------------------------------------------------

def test_simpo_matches_the_published_formula_by_hand() -> None:
    """SimPO (Meng et al. 2024, Eq. 6): -log σ(β/|yw| log π(yw|x) − β/|yl| log π(yl|x) − γ)."""
    chosen, rejected = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -1.0])
    chosen_len, rejected_len = torch.tensor([3, 4]), torch.tensor([3, 2])
    out = simpo_losses(chosen, rejected, chosen_len, rejected_len, beta=2.0, gamma=0.5)
    first = -math.log(1 / (1 + math.exp(-(2.0 * -6 / 3 - 2.0 * -9 / 3 - 0.5))))  # margin 2 - 0.5 = 1.5
    second = -math.log(1 / (1 + math.exp(-(2.0 * -2 / 4 - 2.0 * -1 / 2 - 0.5))))  # margin 0 - 0.5 = -0.5
    torch.testing.assert_close(out.losses, torch.tensor([first, second]))
    assert out.chosen_rewards.tolist() == [-4.0, -1.0] and out.rejected_rewards.tolist() == [-6.0, -1.0]


def test_dpo_hinge_and_sigmoid_by_hand() -> None:
    ones = torch.ones(1, dtype=torch.long)
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    sigmoid = dpo_losses(*args, beta=0.5, loss_type="sigmoid", chosen_tokens=ones, rejected_tokens=ones)
    hinge = dpo_losses(*args, beta=0.5, loss_type="hinge", chosen_tokens=ones, rejected_tokens=ones)
    # delta = (−1 − −2) − (−3 − −2) = 2
    torch.testing.assert_close(sigmoid.losses, torch.tensor([math.log1p(math.exp(-1.0))]))
    torch.testing.assert_close(hinge.losses, torch.tensor([0.0]))
    assert sigmoid.chosen_rewards.item() == 0.5 and sigmoid.rejected_rewards.item() == -0.5


# --- data -------------------------------------------------------------------------------------------------------

def hh_config(trainer: str = "dpo", **preference: object):
    return validate_config({"input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
                            "adapter": {"type": "lora"}, "trainer": {"type": trainer},
                            "preference": {"format": "hh_rlhf", **preference}})


def test_hh_rlhf_pairs_split_into_shared_prefix_and_final_replies() -> None:
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke"
    frame = pd.DataFrame({
        "chosen": [prefix + "\n\nAssistant: Why did the cat sit?", "\n\nHuman: a\n\nAssistant: b"],
        "rejected": [prefix + "\n\nAssistant: No.", "\n\nHuman: other\n\nAssistant: c"],
    })
    normalised, counts = preference_frame(frame, hh_config(), "hh")
    assert counts.dropped_mismatched_prefix == 1 and len(normalised) == 1
    row = normalised.iloc[0]
    assert row["prompt"] == prefix + "\n\nAssistant:"
    assert (row["chosen"], row["rejected"]) == (" Why did the cat sit?", " No.")


def test_hh_rlhf_with_no_shared_prefix_is_refused() -> None:
    frame = pd.DataFrame({"chosen": ["\n\nHuman: a\n\nAssistant: b"], "rejected": ["\n\nHuman: x\n\nAssistant: y"]})
    with pytest.raises(DataError, match="shares its prefix"):
        preference_frame(frame, hh_config(), "hh.jsonl")


def test_the_shared_hh_rlhf_file_loses_few_pairs() -> None:
    from conftest import SHARED_DATA

    path = SHARED_DATA / "hh-rlhf-harmless" / "train.jsonl"
    if not path.is_file():
        pytest.skip("shared hh-rlhf data not present")
    frame = pd.read_json(path, lines=True).head(200)
    normalised, counts = preference_frame(frame, hh_config(), "train.jsonl")
    assert counts.rows == 200 and len(normalised) + counts.dropped_mismatched_prefix + counts.dropped_empty == 200
    assert len(normalised) > 150
    assert all(text.endswith("\n\nAssistant:") for text in normalised["prompt"])


def test_truncation_keeps_the_prompt_end_and_never_cuts_a_response(tokenizer) -> None:
    counts = DataCounts()
    assert fit_pair(list(range(10)), [[1, 2, 3], [4]], 6, counts) == [7, 8, 9]
    assert fit_pair(list(range(10)), [[1] * 6], 6, counts) is None
    assert (counts.prompts_truncated, counts.dropped_response_too_long) == (1, 1)

    config = validate_config({"input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
                              "adapter": {"type": "lora"}, "trainer": {"type": "dpo"},
                              "preference": {"max_length": 12}})
    frame = pd.DataFrame({"prompt": ["a long prompt here", "p"], "chosen": [" ok", " far too long a reply"],
                          "rejected": [" no", " x"]})
    counts = DataCounts(rows=2)
    examples = build_preference_examples(frame, config, tokenizer, counts, "pairs").examples
    assert len(examples) == 1 and counts.dropped_response_too_long == 1 and counts.prompts_truncated == 1
    example = examples[0]
    assert tokenizer.decode(example.prompt_ids) == "prompt here"[-(12 - 4):]
    assert tokenizer.decode(example.chosen_ids) == " ok<|im_end|>"  # whole, with EOS


def test_a_conversation_prompt_is_rendered_whole_through_the_chat_template(tokenizer) -> None:
    """A prompt column of OpenAI messages (a list, or its JSON text) becomes the whole conversation, ready to answer."""
    config = validate_config({"input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
                              "adapter": {"type": "lora"}, "trainer": {"type": "dpo"},
                              "prompt": {"use_chat_template": True}})
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "name a pet"}]
    expected = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    for cell in (turns, json.dumps(turns)):
        frame = pd.DataFrame({"prompt": [cell], "chosen": [" cat"], "rejected": [" rock"]})
        example = build_preference_examples(frame, config, tokenizer, DataCounts(rows=1), "pairs").examples[0]
        assert tokenizer.decode(example.prompt_ids) == expected


def test_kto_labels_are_booleans_and_bad_ones_are_refused() -> None:
    config = validate_config({"input_features": [{"name": "prompt"}], "output_features": [{"name": "completion"}],
                              "adapter": {"type": "lora"}, "trainer": {"type": "kto"}})
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": [True, "false", 1]})
    normalised, _ = preference_frame(frame, config, "kto")
    assert normalised["label"].tolist() == [True, False, True]
    with pytest.raises(DataError, match="row 1, column 'label'.*use true or false"):
        preference_frame(frame.assign(label=[True, "maybe", False]), config, "kto")


@pytest.mark.parametrize(("section", "message"), [
    ({"trainer": {"type": "dpo"}}, "preference.reference: dpo with full fine-tuning needs a reference model"),
    ({"trainer": {"type": "finetune"}, "preference": {"beta": 0.2}}, "preference.beta: applies to trainer.type"),
    ({"trainer": {"type": "simpo"}, "adapter": {"type": "lora"}, "preference": {"loss_type": "ipo"}},
     "preference.loss_type: does not apply to trainer.type simpo"),
    ({"trainer": {"type": "dpo", "eval_metric": "bleu"}, "adapter": {"type": "lora"}}, "set eval_metric: loss"),
])
def test_preference_config_errors_are_one_line(section: dict, message: str) -> None:
    raw = {"input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}], **section}
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(raw)
    assert "\n" not in str(error.value)


# --- runs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer", ["dpo", "orpo", "simpo", "kto"])
def test_each_trainer_runs_and_reports_reward_metrics(trainer: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = pair_rows()
    if trainer == "kto":
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
                for i, r in enumerate(rows)]
    run = tmp_path / "run"
    result = api.train(preference_config(tiny_model_dir, trainer), rows, run, show_progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["type"] == trainer
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "rows"} == \
        set(metrics["validation"])
    assert 0 <= metrics["validation"]["reward_accuracy"] <= 1
    assert "train_reward_accuracy" in metrics["training"] and "accuracy" not in metrics["validation"]
    records = log_lines(run)
    assert all("reward_accuracy" in record and "reward_margin" in record for record in records)
    assert "val_reward_accuracy" in records[-1] and result.metrics["validation"]["rows"] == 4
    if trainer in ("dpo", "kto"):  # a fresh adapter is the reference: the first step's rewards are zero
        assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_learns_the_preference(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = preference_config(tiny_model_dir, trainer={"epochs": 6, "learning_rate": 0.02},
                               preference={"beta": 0.5})
    result = api.train(config, pair_rows(3), tmp_path / "run", show_progress=False)
    records = log_lines(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["loss"] < 0.6 and result.metrics["validation"]["reward_accuracy"] == 1.0


def test_cached_and_uncached_reference_give_the_same_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    cached = api.train(preference_config(tiny_model_dir), pair_rows(), tmp_path / "cached", show_progress=False)
    config = preference_config(tiny_model_dir, preference={"cache_reference": False})
    uncached = api.train(config, pair_rows(), tmp_path / "uncached", show_progress=False)
    for a, b in zip(log_lines(tmp_path / "cached"), log_lines(tmp_path / "uncached"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert cached.metrics["validation"]["reward_accuracy"] == uncached.metrics["validation"]["reward_accuracy"]
    assert "reference_cache" not in uncached.metrics["training"]


def test_reference_cache_is_reused_and_invalidated(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = api.train(preference_config(tiny_model_dir), pair_rows(), tmp_path / "a", show_progress=False)
    assert first.metrics["training"]["reference_cache"] == ["computed", "computed"]
    cache_files = sorted((tmp_path / CACHE_DIR).glob("*.safetensors"))
    assert len(cache_files) == 2
    again = api.train(preference_config(tiny_model_dir), pair_rows(), tmp_path / "b", show_progress=False)
    assert again.metrics["training"]["reference_cache"] == ["reused", "reused"]
    assert log_lines(tmp_path / "a")[-1]["loss"] == log_lines(tmp_path / "b")[-1]["loss"]

    changed_data = [{**row, "rejected": row["rejected"] + "?"} for row in pair_rows()]
    other = api.train(preference_config(tiny_model_dir), changed_data, tmp_path / "c", show_progress=False)
    assert other.metrics["training"]["reference_cache"] == ["computed", "computed"]
    template = preference_config(tiny_model_dir, prompt={"template": "Q: {prompt}"})
    assert api.train(template, pair_rows(), tmp_path / "d", show_progress=False
                     ).metrics["training"]["reference_cache"] == ["computed", "computed"]

    for path in cache_files:  # a damaged cache is recomputed, never trusted
        path.write_bytes(b"not a safetensors file")
    damaged = api.train(preference_config(tiny_model_dir), pair_rows(), tmp_path / "e", show_progress=False)
    assert damaged.metrics["training"]["reference_cache"] == ["computed", "computed"]
    assert log_lines(tmp_path / "e")[-1]["loss"] == log_lines(tmp_path / "a")[-1]["loss"]


def test_interrupted_dpo_run_resumes_bit_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(preference_config(tiny_model_dir, trainer={"checkpoint_steps": 1})))
    data = tmp_path / "pairs.jsonl"
    pd.DataFrame(pair_rows()).to_json(data, orient="records", lines=True)
    runner = CliRunner()
    straight = tmp_path / "runs" / "straight"
    assert runner.invoke(app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o",
                               str(straight)]).exit_code == 0
    out = tmp_path / "runs" / "resumed"
    with signal_at_forward(4, signal.SIGTERM, PreferenceObjective):
        result = runner.invoke(app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o", str(out)])
    assert result.exit_code == 143, result.output
    result = runner.invoke(app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o", str(out),
                                 "--resume"])
    assert result.exit_code == 0, result.output
    assert log_lines(out) == [
        {**record, "tokens_per_s": record_b["tokens_per_s"], "peak_memory_mib": record_b["peak_memory_mib"]}
        for record, record_b in zip(log_lines(straight), log_lines(out), strict=True)]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_preference_run_predicts_evaluates_exports_and_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunewright.config import ServeSettings
    from tunewright.serving.app import create_app
    from tunewright.serving.pool import load_models

    run = tmp_path / "run"
    api.train(preference_config(tiny_model_dir), pair_rows(), run, show_progress=False)
    predictions = api.predict(run, [{"prompt": "say cat:"}], show_progress=False)
    assert isinstance(predictions["prediction"].iloc[0], str)
    evaluated = api.evaluate(run, pair_rows(1), show_progress=False)
    assert set(evaluated) >= {"reward_accuracy", "reward_margin", "loss", "rows"} and evaluated["rows"] == 8
    exported = api.export(run, tmp_path / "merged", merge=True)
    assert (exported / "config.json").is_file()
    models = load_models([f"dpo={run}"], [])
    with TestClient(create_app(models, ServeSettings()), base_url="http://localhost") as client:
        response = client.post("/v1/completions", json={"model": "dpo", "prompt": "say cat:", "max_tokens": 3})
    assert response.status_code == 200, response.text


def test_dpo_from_a_supervised_run_uses_it_as_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import train_tiny_run

    supervised = train_tiny_run(tiny_model_dir, tmp_path / "sft", {"max_steps": 2, "learning_rate": 0.05})
    config = preference_config(tiny_model_dir, adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    result = api.train(config, pair_rows(), tmp_path / "dpo", show_progress=False, from_run=supervised)
    saved = yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())
    assert saved["preference"]["reference"] == str(supervised)
    assert log_lines(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert "reward_accuracy" in result.metrics["validation"]


def test_missing_rejected_column_is_a_data_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(preference_config(tiny_model_dir)))
    data = tmp_path / "pairs.jsonl"
    pd.DataFrame(pair_rows()).drop(columns=["rejected"]).to_json(data, orient="records", lines=True)
    result = CliRunner().invoke(app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o",
                                      str(tmp_path / "run")])
    assert result.exit_code == 3
    assert "column 'rejected' not found" in result.output and "Traceback" not in result.output


def test_every_response_too_long_is_a_data_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = preference_config(tiny_model_dir, preference={"max_length": 3})
    with pytest.raises(DataError, match="no pair fits preference.max_length"):
        api.train(config, pair_rows(), tmp_path / "run", show_progress=False)


def test_full_fine_tuning_dpo_against_an_earlier_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning has no adapter to disable: preference.reference names the reference run."""
    from conftest import train_tiny_run

    supervised = train_tiny_run(tiny_model_dir, tmp_path / "sft", {"max_steps": 2, "learning_rate": 0.05})
    config = preference_config(tiny_model_dir, preference={"reference": str(supervised)})
    config["adapter"] = {"type": "full", "trainable_layers": [-1]}
    result = api.train(config, pair_rows(), tmp_path / "dpo", show_progress=False)
    assert result.metrics["training"]["reference_cache"] == ["computed", "computed"]
    assert log_lines(tmp_path / "dpo")[0]["reward_margin"] != 0.0  # the base policy differs from the SFT reference
    assert 0 <= result.metrics["validation"]["reward_accuracy"] <= 1
