"""Faults during training: non-finite losses and gradients, out of memory. Real faults, no mocks.

A NaN loss comes from a huge learning rate (full fine-tuning: the first update blows the weights
up). A non-finite gradient under a finite loss comes from a tensor hook on a LoRA weight: LoRA
weights blown up on q/v no longer give one reliably, because per-sample attention saturates
instead of overflowing. Out of memory is raised by a forward pre-hook on the tiny model, the way
CUDA raises it from inside a forward pass.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import build_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunewright import fine_tune
from tunewright.adapters import attach_adapter
from tunewright.checkpoint import CHECKPOINT_DIR, list_checkpoints
from tunewright.cli import app
from tunewright.config import AdapterConfig, TrainerConfig
from tunewright.data import build_examples, encode_prompts
from tunewright.errors import TrainingError
from tunewright.objective import LanguageModelObjective
from tunewright.run import read_status
from tunewright.train import fit, trainable_state


def write_config(tiny_config: dict, tmp_path: Path, adapter: dict, **trainer: object) -> Path:
    config = {
        **tiny_config,
        "adapter": adapter,
        "trainer": {"max_steps": 5, "batch_size": 4, "checkpoint_steps": 1, "keep_checkpoints": 5, **trainer},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def train(config: Path, data: Path, out: Path) -> object:
    return CliRunner().invoke(app, ["--quiet", "train", "-c", str(config), "-d", str(data), "-o", str(out)])


LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture
def infinite_gradient_at(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Make the first trainable weight's gradient inf in the given optimizer steps (1-based).

    One micro-batch per step in these configs, so the n-th backward pass is step n.
    """

    def install(steps: set[int]) -> None:
        original = fine_tune.trainable_model

        def with_fault(*args: object, **kwargs: object) -> torch.nn.Module:
            model = original(*args, **kwargs)
            weight = next(p for p in model.parameters() if p.requires_grad)
            backward_passes = itertools.count(1)
            weight.register_hook(lambda grad: grad.new_full(grad.shape, math.inf)
                                 if next(backward_passes) in steps else grad)
            return model

        monkeypatch.setattr(fine_tune, "trainable_model", with_fault)

    return install


@pytest.mark.parametrize(
    ("adapter", "what"), [({"type": "full"}, "the loss is nan"), (LORA, "a gradient is not finite")]
)
def test_nonfinite_stops_at_the_step_and_keeps_the_last_finite_checkpoint(
    adapter: dict, what: str, tiny_config: dict, copy_csv: Path, tmp_path: Path, infinite_gradient_at
) -> None:
    if adapter["type"] == "full":  # step 1's update (lr 1e30) makes step 2's loss NaN
        config = write_config(tiny_config, tmp_path, adapter, learning_rate=1e30)
    else:
        infinite_gradient_at({2})
        config = write_config(tiny_config, tmp_path, adapter)
    out = tmp_path / "run"
    result = train(config, copy_csv, out)
    assert result.exit_code == 6
    message = " ".join(result.output.split())
    assert "training stopped at optimizer step 2 (epoch 0)" in message and what in message
    assert "step-000001" in message and "Traceback" not in result.output
    status = read_status(out)
    assert status["status"] == "failed" and "optimizer step 2" in status["error"]
    assert [step for step, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [1]
    weights = load_file(out / CHECKPOINT_DIR / "step-000001" / "weights.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_skip_batch_skips_nonfinite_steps_and_never_applies_them(
    tiny_config: dict, copy_csv: Path, tmp_path: Path, infinite_gradient_at
) -> None:
    infinite_gradient_at({2, 3, 4})
    config = write_config(tiny_config, tmp_path, LORA, on_nonfinite="skip_batch")
    out = tmp_path / "run"
    result = train(config, copy_csv, out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    skipped = [record["step"] for record in records if record.get("skipped")]
    assert skipped == [2, 3, 4]
    assert all(record["loss"] is None for record in records if record.get("skipped"))
    # Skipped steps changed nothing: after step 4 the adapter is still the one after step 1.
    after_step_1 = load_file(out / CHECKPOINT_DIR / "step-000001" / "weights.safetensors")
    after_step_4 = load_file(out / CHECKPOINT_DIR / "step-000004" / "weights.safetensors")
    for name, tensor in after_step_1.items():
        assert torch.equal(after_step_4[name], tensor)
    after_step_5 = load_file(out / CHECKPOINT_DIR / "step-000005" / "weights.safetensors")
    assert any(not torch.equal(after_step_5[name], tensor) for name, tensor in after_step_1.items())
    assert read_status(out)["status"] == "complete"


def test_skip_batch_gives_up_after_max_skipped_steps(
    tiny_config: dict, copy_csv: Path, tmp_path: Path, infinite_gradient_at
) -> None:
    infinite_gradient_at({2, 3, 4, 5})
    config = write_config(tiny_config, tmp_path, LORA, on_nonfinite="skip_batch", max_skipped_steps=2)
    result = train(config, copy_csv, tmp_path / "run")
    assert result.exit_code == 6
    message = " ".join(result.output.split())
    assert "optimizer step 4" in message and "2 steps were skipped already" in message


# --- out of memory ------------------------------------------------------------------------------------

PROMPTS = ["say cat:", "say a longer thing:", "hi:", "x", "say dog:", "sun", "a b c d:", "q"] * 2
TARGETS = ["cat", "dog dog", "yo", "a much longer target text", "dog", "sea", "e", "r"] * 2


def train_tiny(
    tokenizer, oom_on_forward: int | None = None, dropout: float = 0.0, **trainer: object
) -> tuple[list, dict, list[int]]:
    """Train a fresh tiny LoRA model; optionally raise out-of-memory on one forward call (first attempt only).

    Returns (per-step losses, final trainable weights, micro-batch sizes of every training forward).
    """
    model = attach_adapter(build_model(len(tokenizer)), AdapterConfig(r=4, alpha=8, dropout=dropout))
    objective = LanguageModelObjective(model)
    examples = build_examples(encode_prompts(PROMPTS, tokenizer), TARGETS, tokenizer)
    calls, sizes = 0, []

    def hook(module: torch.nn.Module, _args: object, kwargs: dict) -> None:
        nonlocal calls
        if not module.training:
            return
        calls += 1
        if calls == oom_on_forward:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(int(kwargs["input_ids"].shape[0]))  # rows of this micro-batch (packing is off)

    objective.register_forward_pre_hook(hook, with_kwargs=True)
    cfg = TrainerConfig(**{"max_steps": 6, "learning_rate": 0.01, "packing": False, **trainer})
    result = fit(
        objective, examples, [], cfg, Accelerator(cpu=True), tokenizer.pad_token_id, show_progress=False
    )
    return [record["loss"] for record in result.history], trainable_state(objective), sizes


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_loss_curve(tokenizer, caplog) -> None:
    normal_losses, normal_weights, _ = train_tiny(tokenizer, batch_size=4, gradient_accumulation_steps=2)
    # Out of memory on the 2nd forward: inside step 1's window, after one micro-batch's backward.
    losses, weights, sizes = train_tiny(
        tokenizer, oom_on_forward=2, batch_size=4, gradient_accumulation_steps=2, halve_batch_on_oom=True
    )
    assert "retrying with micro-batches of 2" in caplog.text
    assert sizes[0] == 4 and set(sizes[1:]) == {2}
    # Same samples per step and the same token normalisation: the curve matches the normal run up to
    # float rounding of the different summation order ...
    assert losses == pytest.approx(normal_losses, rel=1e-5)
    for name, tensor in normal_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6)
    # ... and is bit for bit the run configured with half the micro-batch and twice the accumulation.
    halved_losses, halved_weights, _ = train_tiny(tokenizer, batch_size=2, gradient_accumulation_steps=4)
    assert losses == halved_losses
    for name, tensor in halved_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert all(math.isfinite(loss) for loss in losses)


def test_out_of_memory_retry_redraws_the_same_dropout_masks(tokenizer) -> None:
    # The failed first attempt drew dropout masks; the retry must start from the same RNG state.
    losses, weights, _ = train_tiny(
        tokenizer,
        oom_on_forward=2,
        dropout=0.1,
        batch_size=4,
        gradient_accumulation_steps=2,
        halve_batch_on_oom=True,
    )
    halved_losses, halved_weights, _ = train_tiny(
        tokenizer, dropout=0.1, batch_size=2, gradient_accumulation_steps=4
    )
    assert losses == halved_losses
    for name, tensor in halved_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_out_of_memory_without_the_option_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(
        TrainingError,
        match=r"out of memory at optimizer step 1 with a micro-batch of 4; set "
        r"trainer.halve_batch_on_oom: true",
    ):
        train_tiny(tokenizer, oom_on_forward=1, batch_size=4)


def test_out_of_memory_at_micro_batch_one_gives_up(tokenizer) -> None:
    with pytest.raises(TrainingError, match="with a micro-batch of 1; shorten the inputs"):
        train_tiny(tokenizer, oom_on_forward=1, batch_size=1, halve_batch_on_oom=True)


def test_a_different_runtime_error_is_not_taken_for_out_of_memory(tokenizer) -> None:
    model = attach_adapter(build_model(len(tokenizer)), AdapterConfig(r=4, alpha=8, dropout=0.0))
    objective = LanguageModelObjective(model)

    def hook(_module: torch.nn.Module, _args: object) -> None:
        raise RuntimeError("shape mismatch")

    objective.register_forward_pre_hook(hook)
    examples = build_examples(encode_prompts(PROMPTS, tokenizer), TARGETS, tokenizer)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fit(
            objective,
            examples,
            [],
            TrainerConfig(max_steps=1, halve_batch_on_oom=True),
            Accelerator(cpu=True),
            tokenizer.pad_token_id,
            show_progress=False,
        )
