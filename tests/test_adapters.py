"""Adapters on the tiny model, one case per adapter type: the PEFT invariants.

For every type: save -> load gives identical logits and tokens; a disabled adapter gives exactly
the base model's output; merged and unmerged logits agree (atol 1e-5; not applicable to prompt
and prefix tuning, whose virtual tokens are not weights); training changes only what should train.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import build_model, build_tokenizer, copy_rows
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tunewright
from tunewright.adapters import adapter_penalty, attach_adapter, count_parameters, optimizer_step_hook, peft_config_for
from tunewright.cli import app
from tunewright.config import AdapterConfig, TrainerConfig, config_to_dict, load_config
from tunewright.data import build_examples
from tunewright.errors import ConfigError, ModelLoadError, RunFolderError
from tunewright.objective import LanguageModelObjective
from tunewright.train import fit

MERGE_ATOL = 1e-5  # merging re-associates float32 sums; anything above this is a real difference
CASES: dict[str, dict] = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "lora_dora_rslora_all_linear": {
        "type": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "use_dora": True,
        "use_rslora": True,
        "target_modules": "all-linear",
    },
    "adalora": {"type": "adalora", "r": 2, "init_r": 4, "alpha": 8, "dropout": 0.0, "tinit": 1, "tfinal": 1},
    "ia3": {"type": "ia3"},
    "loha": {"type": "loha", "r": 4, "alpha": 8},
    "lokr": {"type": "lokr", "r": 4, "alpha": 8},
    "prompt_tuning": {"type": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"type": "prefix_tuning", "num_virtual_tokens": 4},
    "full_last_layer": {"type": "full", "trainable_layers": [-1], "trainable_modules": ["lm_head"]},
}
# Parameter names each case may train (anything else must stay frozen and unchanged).
TRAINABLE_NAMES = {
    "lora": r"lora_[AB]",
    "lora_dora_rslora_all_linear": r"lora_(A|B|magnitude_vector)",
    "adalora": r"lora_[ABE]",
    "ia3": r"ia3_l",
    "loha": r"hada_",
    "lokr": r"lokr_",
    "prompt_tuning": r"prompt_encoder",
    "prefix_tuning": r"prompt_encoder",
    "full_last_layer": r"^(model\.layers\.1\.|lm_head\.)",
}
PEFT_CASES = [name for name in CASES if CASES[name]["type"] != "full"]


def case_config(model_dir: Path, adapter: dict, **trainer: object) -> dict:
    return {
        "base_model": str(model_dir),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo", "type": "text"}],
        "prompt": {"template": "say {word}:"},
        "adapter": adapter,
        "trainer": {"max_steps": 6, "batch_size": 4, "learning_rate": 0.02, **trainer},
        "generation": {"max_new_tokens": 5, "batch_size": 8},
        "preprocessing": {"split": [0.75, 0.25, 0.0]},
    }


@pytest.fixture(scope="module", params=list(CASES))
def trained(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short training run per adapter type (shared by the tests of this module)."""
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    config = case_config(tiny_model_dir, CASES[request.param])
    result = tunewright.train(config, copy_rows(), run_dir, show_progress=False)
    return request.param, result


def probe_batch() -> dict[str, torch.Tensor]:
    tokenizer = build_tokenizer()
    return dict(tokenizer(["say cat:", "say owl:"], return_tensors="pt"))


@torch.no_grad()
def logits_of(model: torch.nn.Module) -> torch.Tensor:
    batch = probe_batch()
    logits = model(**batch).logits
    return logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning prepends virtual-token positions


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_save_then_load_gives_identical_logits_and_tokens(trained) -> None:
    name, result = trained
    loaded = tunewright.load(result.run_dir)
    if name == "adalora":
        # AdaLoRA saves only the ranks it kept: the loaded matrices are smaller, and a matmul of
        # another shape may round differently in the last bit (seen on AMD EPYC, not on Intel).
        assert torch.allclose(logits_of(result.model.model), logits_of(loaded.model), rtol=0, atol=1e-6)
    else:
        assert torch.equal(logits_of(result.model.model), logits_of(loaded.model))
    rows = copy_rows(8)
    before = tunewright.predict(result.model, rows)["prediction"].tolist()
    assert tunewright.predict(loaded, rows)["prediction"].tolist() == before


def test_disabled_adapter_gives_exactly_the_base_output(trained, tiny_model_dir: Path) -> None:
    name, result = trained
    loaded = tunewright.load(result.run_dir)
    base_logits = logits_of(base_model(tiny_model_dir))
    if name not in PEFT_CASES:
        pytest.skip("full fine-tuning has no adapter to disable")
    assert not torch.allclose(logits_of(loaded.model), base_logits, atol=1e-4)  # the adapter does something
    with loaded.model.disable_adapter():
        assert torch.equal(logits_of(loaded.model), base_logits)


def test_merged_and_unmerged_logits_agree(trained) -> None:
    name, result = trained
    loaded = tunewright.load(result.run_dir)
    if CASES[name]["type"] in ("prompt_tuning", "prefix_tuning"):
        with pytest.raises(ConfigError, match="cannot be merged"):
            tunewright_merge(loaded)
        return
    unmerged = logits_of(loaded.model)
    merged = tunewright_merge(loaded)
    torch.testing.assert_close(logits_of(merged), unmerged, atol=MERGE_ATOL, rtol=0)


def tunewright_merge(loaded):
    from tunewright.export import merged_model

    return merged_model(loaded)


def test_parameter_report_counts_what_trains(trained) -> None:
    name, result = trained
    report = result.metrics["training"]
    assert 0 < report["trainable_parameters"] < report["total_parameters"]
    trainable = [n for n, p in result.model.model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(TRAINABLE_NAMES[name], n) for n in trainable), trainable


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_training_changes_only_the_trainable_parameters(name: str, precision: str) -> None:
    """In bf16 the frozen weights are held in bf16 during training and must come back bit for bit."""
    tokenizer = build_tokenizer()
    model = attach_adapter(build_model(len(tokenizer)), AdapterConfig(**CASES[name]), total_steps=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(TRAINABLE_NAMES[name], n) for n in trainable), trainable
    rows = copy_rows(8)
    prompts = tokenizer([f"say {word}:" for word in rows["word"]])["input_ids"]
    examples = build_examples(prompts, rows["echo"].tolist(), tokenizer)
    cfg = TrainerConfig(max_steps=4, batch_size=4, learning_rate=0.02, precision=precision)
    fit(
        LanguageModelObjective(model),
        examples,
        [],
        cfg,
        Accelerator(cpu=True),
        tokenizer.pad_token_id,
        show_progress=False,
        after_optimizer_step=optimizer_step_hook(model),
    )
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    trained_changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert frozen_changed == []
    assert set(trained_changed) == trainable  # and every trainable tensor did move
    assert {p.dtype for p in after.values()} == {torch.float32}


def test_adalora_reallocates_ranks_and_adds_its_orthogonality_penalty() -> None:
    tokenizer = build_tokenizer()
    model = attach_adapter(build_model(len(tokenizer)), AdapterConfig(**CASES["adalora"]), total_steps=6)
    assert adapter_penalty(model) is not None and adapter_penalty(model).item() > 0
    rows = copy_rows(8)
    examples = build_examples(
        tokenizer([f"say {w}:" for w in rows["word"]])["input_ids"], rows["echo"].tolist(), tokenizer
    )
    fit(
        LanguageModelObjective(model),
        examples,
        [],
        TrainerConfig(max_steps=6, batch_size=4, learning_rate=0.02),
        Accelerator(cpu=True),
        tokenizer.pad_token_id,
        show_progress=False,
        after_optimizer_step=optimizer_step_hook(model),
    )
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern  # the budget was allocated: a keep-mask per adapted matrix
    kept = sum(sum(mask) for mask in rank_pattern.values())
    assert kept == 2 * len(rank_pattern)  # r (target average rank) = 2 of init_r = 4 per module


def test_other_adapters_have_no_hook_or_penalty() -> None:
    model = attach_adapter(build_model(len(build_tokenizer())), AdapterConfig(type="lora"))
    assert optimizer_step_hook(model) is None and adapter_penalty(model) is None


def test_adalora_schedule_must_leave_steps_for_pruning() -> None:
    model = build_model(len(build_tokenizer()))
    with pytest.raises(ConfigError, match=r"adapter: tinit \(3\) \+ tfinal \(2\) leave none of the 5"):
        peft_config_for(model, AdapterConfig(type="adalora", tinit=3, tfinal=2), total_steps=5)


def test_default_target_modules_follow_the_architecture() -> None:
    model = build_model(len(build_tokenizer()))
    # all-linear (docs/recipes.md): peft resolves it to every linear layer but the output layer.
    for kind in ("lora", "loha", "lokr"):
        assert peft_config_for(model, AdapterConfig(type=kind)).target_modules == "all-linear"
    wrapped = attach_adapter(build_model(len(build_tokenizer())), AdapterConfig(type="lora"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adalora = peft_config_for(model, AdapterConfig(type="adalora"), total_steps=10)
    assert set(adalora.target_modules) == {"q_proj", "v_proj"}
    ia3 = peft_config_for(model, AdapterConfig(type="ia3"))
    assert set(ia3.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(ia3.feedforward_modules) == {"down_proj"}
    ia3_attention = peft_config_for(model, AdapterConfig(type="ia3", target_modules=["q_proj"]))
    assert set(ia3_attention.feedforward_modules) == set()


def test_full_fine_tuning_without_choices_trains_everything() -> None:
    model = build_model(len(build_tokenizer()))
    attach_adapter(model, None)
    report = count_parameters(model)
    assert report.trainable == report.total and report.fraction == 1.0


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (
            {"type": "full", "trainable_layers": [2]},
            "adapter.trainable_layers: layer 2 does not exist (the model has 2)",
        ),
        (
            {"type": "full", "trainable_modules": ["no_such"]},
            "adapter.trainable_modules: 'no_such' matches no parameter",
        ),
    ],
)
def test_full_fine_tuning_choices_are_checked(adapter: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        attach_adapter(build_model(len(build_tokenizer())), AdapterConfig(**adapter))


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"target_modules": ["q_projj"]}, "adapter.target_modules: 'q_projj' matches no module of the model "
                                          "(did you mean 'q_proj'?)"),
        # peft itself only warns when another entry matches: the unmatched one would do nothing
        ({"target_modules": ["q_proj", "zzzzzz"]}, "adapter.target_modules: 'zzzzzz' matches no module of the "
                                                   "model (its layers: embed_tokens, q_proj, k_proj, v_proj"),
        ({"target_modules": ["mlp"]}, "adapter.target_modules: 'mlp' names LlamaMLP blocks, which cannot hold an "
                                      "adapter; name the layers inside: gate_proj, up_proj, down_proj"),
        ({"type": "loha", "target_modules": ["v_prj"]}, "'v_prj' matches no module of the model (did you mean "
                                                        "'v_proj'?)"),
    ],
)
def test_target_modules_are_checked_against_the_model(adapter: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        attach_adapter(build_model(len(build_tokenizer())), AdapterConfig(**adapter))


def test_ia3_feedforward_modules_must_be_targets() -> None:
    adapter = AdapterConfig(type="ia3", target_modules=["k_proj", "down_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(ConfigError, match=re.escape("adapter.feedforward_modules: 'up_proj' is not one of "
                                                    "adapter.target_modules (k_proj, down_proj)")):
        attach_adapter(build_model(len(build_tokenizer())), adapter)


def test_matching_target_modules_still_attach() -> None:
    model = build_model(len(build_tokenizer()))
    wrapped = attach_adapter(model, AdapterConfig(target_modules=["self_attn.q_proj", "down_proj"]))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 4 and all(name.endswith(("q_proj", "down_proj")) for name in adapted)


def test_unknown_target_module_is_one_line_and_exit_4(tmp_path: Path, tiny_model_dir: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(case_config(tiny_model_dir, {"type": "lora", "target_modules": ["qproj"]})))
    data = tmp_path / "data.csv"
    copy_rows().to_csv(data, index=False)
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(config_path)]).exit_code == 0  # names are known only with a model
    result = runner.invoke(app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o",
                                 str(tmp_path / "run")])
    assert result.exit_code == 4, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: adapter.target_modules: 'qproj' matches no module of the model "
                     "(did you mean 'q_proj'?)"]


# --- config -----------------------------------------------------------------------------------------


def minimal(**sections: object) -> dict:
    return {"input_features": [{"name": "a"}], "output_features": [{"name": "b"}], **sections}


@pytest.mark.parametrize("name", list(CASES))
def test_resolved_config_of_every_adapter_reloads(name: str) -> None:
    config = load_config(minimal(adapter=CASES[name]))
    assert load_config(config_to_dict(config)) == config


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (
            {"type": "ia3", "use_dora": True},
            "adapter: 'use_dora' does not apply to type 'ia3' (only to lora)",
        ),
        ({"type": "prompt_tuning", "r": 4}, "adapter: 'r' does not apply to type 'prompt_tuning'"),
        (
            {"type": "lora", "trainable_layers": [0]},
            "adapter: 'trainable_layers' does not apply to type 'lora'",
        ),
        (
            {"type": "adalora", "r": 16},
            "adapter: r (16) is the rank kept after pruning; it cannot exceed init_r (12)",
        ),
        ({"type": "lora", "target_modules": "all"}, "adapter.target_modules"),
    ],
)
def test_adapter_keys_are_checked(adapter: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(minimal(adapter=adapter))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"quantization": {"bits": 4}}, "quantization: quantized weights cannot be fully fine-tuned"),
        (
            {"quantization": {"bits": 4}, "adapter": {"type": "full"}},
            "quantization: quantized weights cannot",
        ),
        (
            {"quantization": {"bits": 8, "quant_type": "fp4"}, "adapter": {}},
            "quantization: 'quant_type' applies to bits 4",
        ),
        (
            {"quantization": {}, "adapter": {}, "backend": {"device": "cpu"}},
            "quantization: 4/8-bit loading needs CUDA",
        ),
    ],
)
def test_quantization_contradictions_are_config_errors(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(minimal(**sections))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_quantization_without_cuda_fails_before_loading_with_one_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = case_config(tiny_model_dir, CASES["lora"])
    config["quantization"] = {"bits": 4}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    data = tmp_path / "data.csv"
    copy_rows().to_csv(data, index=False)
    run_dir = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(config_path)]).exit_code == 0  # the schema itself is fine
    result = runner.invoke(
        app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o", str(run_dir)]
    )
    assert result.exit_code == 7, result.output  # ConfigError
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: quantization: 4-bit loading (bitsandbytes) needs a CUDA"
    )
    assert not run_dir.exists()  # refused before the run folder, the data or the model


# --- continue training --------------------------------------------------------------------------------


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_continue_training_starts_from_the_saved_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = tunewright.train(
        case_config(tiny_model_dir, CASES["lora"]), copy_rows(), tmp_path / "a", show_progress=False
    )
    saved = adapter_weights(first.model.model)
    # A tiny learning rate (steps of ~1e-6): the continued adapter must still be the saved one,
    # not a fresh one (a fresh LoRA has lora_B == 0).
    config = case_config(tiny_model_dir, CASES["lora"], learning_rate=1e-6, max_steps=1)
    second = tunewright.train(
        config, copy_rows(12), tmp_path / "b", show_progress=False, from_run=first.run_dir
    )
    continued = adapter_weights(second.model.model)
    assert continued.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(continued[name], saved[name], atol=1e-5, rtol=0)
    assert any(not torch.equal(continued[n], saved[n]) for n in saved)  # and it did train
    assert all(p.requires_grad for n, p in second.model.model.named_parameters() if "lora_" in n)


def test_continue_training_a_partial_full_fine_tune(tmp_path: Path, tiny_model_dir: Path) -> None:
    adapter = CASES["full_last_layer"]
    first = tunewright.train(
        case_config(tiny_model_dir, adapter), copy_rows(), tmp_path / "a", show_progress=False
    )
    config = case_config(tiny_model_dir, adapter, learning_rate=1e-6, max_steps=1)
    second = tunewright.train(
        config, copy_rows(12), tmp_path / "b", show_progress=False, from_run=first.run_dir
    )
    first_weights = dict(first.model.model.named_parameters())
    for name, parameter in second.model.model.named_parameters():
        torch.testing.assert_close(parameter, first_weights[name], atol=1e-5, rtol=0)
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_continue_training_refuses_a_different_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = tunewright.train(
        case_config(tiny_model_dir, CASES["lora"]), copy_rows(), tmp_path / "a", show_progress=False
    )
    config = case_config(tiny_model_dir, {**CASES["lora"], "r": 8})
    with pytest.raises(ConfigError, match="adapter: differs from the adapter section of"):
        tunewright.train(config, copy_rows(), tmp_path / "b", show_progress=False, from_run=first.run_dir)
    assert not (tmp_path / "b").exists()


def test_continue_training_needs_a_finetune_trainer_and_a_complete_run(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    zero_shot = case_config(tiny_model_dir, CASES["lora"])
    zero_shot["trainer"] = {"type": "none"}
    with pytest.raises(ConfigError, match="trainer.type: 'none' trains nothing"):
        tunewright.train(zero_shot, copy_rows(), tmp_path / "b", show_progress=False, from_run=tmp_path / "a")
    with pytest.raises(RunFolderError, match="run folder not found"):
        tunewright.train(
            case_config(tiny_model_dir, CASES["lora"]),
            copy_rows(),
            tmp_path / "b",
            show_progress=False,
            from_run=tmp_path / "a",
        )
    assert not (tmp_path / "b").exists()


def test_wrapping_raises_no_library_deprecation_warning(tiny_model) -> None:
    """peft reads transformers' deprecated `is_gradient_checkpointing`; users should not see that on every run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        attach_adapter(tiny_model, AdapterConfig(type="lora", r=2), total_steps=10)
