from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, TrainerConfig, load_config
from tunewright.data import build_examples, collate_training, encode_prompts
from tunewright.errors import ConfigError
from tunewright.objective import LanguageModelObjective
from tunewright.train import fit, learning_rate_schedule, trainable_state

PROMPTS = ["say cat:", "say a longer thing:", "hi:", "x"]
TARGETS = ["cat", "dog dog", "yo", "a much longer target text"]
MINIMAL_CONFIG = {"input_features": [{"name": "question"}], "output_features": [{"name": "answer"}]}


def examples_for(tokenizer, prompts=PROMPTS, targets=TARGETS):
    return build_examples(encode_prompts(prompts, tokenizer), targets, tokenizer)


def loss_of(objective, examples, pad_id):
    return objective(**collate_training(examples, pad_id)).loss_sum


def test_loss_does_not_change_with_padding_or_batch_order(tiny_model, tokenizer) -> None:
    objective = LanguageModelObjective(tiny_model)
    examples = examples_for(tokenizer)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        one_by_one = sum(loss_of(objective, [example], pad) for example in examples)
        together = loss_of(objective, examples, pad)
        reversed_order = loss_of(objective, examples[::-1], pad)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_order, together, rtol=1e-5, atol=1e-5)


def test_loss_counts_only_target_tokens(tiny_model, tokenizer) -> None:
    examples = examples_for(tokenizer)
    out = LanguageModelObjective(tiny_model)(**collate_training(examples, tokenizer.pad_token_id))
    # each target's tokens plus its EOS
    assert int(out.count) == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TARGETS)


def test_loss_equals_transformers_masked_loss(tiny_model, tokenizer) -> None:
    batch = collate_training(examples_for(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = LanguageModelObjective(tiny_model)(**batch)
        reference = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss  # mean over unmasked shifted labels
    torch.testing.assert_close(ours.loss_sum / ours.count, reference, rtol=1e-5, atol=1e-6)


LORA = AdapterConfig(r=4, alpha=8, dropout=0.0)


def train_copy(tiny_model, tokenizer, adapter=LORA, **trainer):
    model = attach_adapter(tiny_model, adapter)
    cfg = TrainerConfig(lr_scheduler="constant", max_grad_norm=None, **trainer)
    result = fit(LanguageModelObjective(model), examples_for(tokenizer), [], cfg, Accelerator(cpu=True),
                 tokenizer.pad_token_id, show_progress=False)
    return model, result


def test_gradient_accumulation_gives_the_same_update(tokenizer) -> None:
    from conftest import build_model

    full_batch, _ = train_copy(build_model(len(tokenizer)), tokenizer, batch_size=4, max_steps=1)
    accumulated, _ = train_copy(build_model(len(tokenizer)), tokenizer, batch_size=2, gradient_accumulation_steps=2,
                                max_steps=1)
    for name, tensor in trainable_state(full_batch).items():
        torch.testing.assert_close(trainable_state(accumulated)[name], tensor, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_logs_each_step(tiny_model, tokenizer) -> None:
    # Full fine-tuning: the random tiny model's frozen LM head is too small for LoRA alone to move its logits fast.
    model, result = train_copy(tiny_model, tokenizer, adapter=None, batch_size=2, epochs=10, learning_rate=0.01)
    assert result.steps == 20 and len(result.history) == 20
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert all(record["tokens_per_s"] > 0 for record in result.history)


def test_only_adapter_weights_change(tiny_model, tokenizer) -> None:
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    model, _ = train_copy(tiny_model, tokenizer, batch_size=4, max_steps=2, learning_rate=0.05)
    after = model.get_base_model().state_dict()
    for name, tensor in before.items():
        # Adapted layers keep their frozen weight under base_layer.
        wrapped = name.replace("_proj.weight", "_proj.base_layer.weight")
        assert torch.equal(after[wrapped if wrapped in after else name], tensor), name


def test_early_stopping_restores_the_best_weights(tiny_model, tokenizer) -> None:
    model = attach_adapter(tiny_model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    examples = examples_for(tokenizer)
    # A huge learning rate makes validation loss worse after the first evaluation.
    cfg = TrainerConfig(batch_size=4, epochs=20, learning_rate=5.0, eval_every=1, early_stopping_patience=2,
                        lr_scheduler="constant")
    result = fit(LanguageModelObjective(model), examples, examples, cfg, Accelerator(cpu=True),
                 tokenizer.pad_token_id, show_progress=False)
    assert result.stopped_early and result.steps < 20
    val_losses = [record["val_loss"] for record in result.history]
    assert result.best_val_loss == min(val_losses)


@pytest.mark.parametrize(("trainer", "step", "expected"), [
    ({"lr_scheduler": "constant"}, 5, 1.0),
    ({"lr_scheduler": "linear", "warmup_steps": 4}, 0, 0.0),
    ({"lr_scheduler": "linear", "warmup_steps": 4}, 2, 0.5),
    ({"lr_scheduler": "linear", "warmup_steps": 4}, 8, 0.5),
    ({"lr_scheduler": "linear", "warmup_ratio": 0.5}, 3, 0.5),
    ({"lr_scheduler": "cosine"}, 6, 0.5),
    ({"lr_scheduler": "cosine"}, 12, 0.0),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2}}, 3, 0.5),
    ({"lr_scheduler": "warmup_stable_decay"}, 9, 1.0),  # decays over the last 10% by default
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 6}}, 12, 0.0),
])
def test_lr_schedule_is_transformers_schedule(trainer: dict, step: int, expected: float) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer = trainer if "warmup_steps" in trainer or "warmup_ratio" in trainer else {**trainer, "warmup_ratio": 0.0}
    schedule = learning_rate_schedule(optimizer, TrainerConfig(**trainer), total_steps=12)
    for _ in range(step):
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(expected, abs=1e-6)


def test_the_default_warmup_is_five_percent_and_warmup_steps_replaces_it() -> None:
    def rates(trainer: TrainerConfig, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = learning_rate_schedule(optimizer, trainer, total_steps=40)
        seen = []
        for _ in range(steps):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return seen

    assert rates(TrainerConfig(), 3) == pytest.approx([0.0, 0.5, 1.0])  # 5% of 40 steps: 2 of warmup
    assert rates(TrainerConfig(warmup_steps=4), 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert rates(TrainerConfig(warmup_ratio=0.0), 1) == pytest.approx([1.0])


@pytest.mark.parametrize(("trainer", "message"), [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "set warmup_steps or warmup_ratio, not both"),
    ({"lr_scheduler": "linear", "lr_scheduler_kwargs": {"num_cycles": 2}},
     "lr_scheduler_kwargs.num_cycles is not an argument of the linear schedule"),
])
def test_schedule_settings_that_do_nothing_are_refused(trainer: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({**MINIMAL_CONFIG, "trainer": trainer})
