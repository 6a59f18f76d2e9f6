"""Speed switches: bf16 autocast trains to the same loss; gradient checkpointing changes nothing."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import build_model

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, TrainerConfig, load_config
from tunewright.data import IGNORE_INDEX, Example, collate_training
from tunewright.kernels.precision import autocast_for, mixed_precision_for
from tunewright.kernels.switches import cpu_has_native_bf16
from tunewright.model import enable_gradient_checkpointing
from tunewright.objective import LanguageModelObjective
from tunewright.train import fit

CPU = torch.device("cpu")


def copy_examples(count: int = 16) -> list[Example]:
    """A learnable toy task: the target repeats the prompt's three tokens."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        prompt = torch.randint(3, 200, (3,), generator=generator).tolist()
        target = [*prompt, 2]
        examples.append(Example(prompt + target, [IGNORE_INDEX] * 3 + target, prompt_len=3))
    return examples


def lora(seed: int = 0) -> LanguageModelObjective:
    model = build_model(259, seed=seed)
    torch.manual_seed(1)
    return LanguageModelObjective(attach_adapter(model, AdapterConfig(r=4, alpha=8, dropout=0.0)))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_precision_resolves_per_device(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    monkeypatch.setenv("TUNEWRIGHT_CPU_BF16", "native" if native_bf16 else "emulated")
    assert mixed_precision_for("fp32", CPU) == "no"
    assert mixed_precision_for("bf16", CPU) == "bf16"
    # On CPU, auto takes bf16 only where the hardware multiplies bf16 natively.
    assert mixed_precision_for("auto", CPU) == ("bf16" if native_bf16 else "no")


def test_native_bf16_probe_answers() -> None:
    assert isinstance(cpu_has_native_bf16(), bool)


def test_precision_is_validated_by_the_schema() -> None:
    base = {"input_features": [{"name": "a"}], "output_features": [{"name": "b"}]}
    assert load_config({**base, "trainer": {"precision": "bf16"}}).trainer.precision == "bf16"
    with pytest.raises(Exception, match=r"trainer\.precision"):
        load_config({**base, "trainer": {"precision": "fp8"}})


def test_bf16_autocast_runs_the_matmuls_in_bf16() -> None:
    objective = lora()
    seen: list[torch.dtype] = []
    base = objective.model.get_base_model()
    base.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = collate_training(copy_examples(2), pad_id=0)
    with autocast_for("bf16", CPU):
        out = objective(**batch)
    with autocast_for("fp32", CPU):
        objective(**batch)
    assert seen == [torch.bfloat16, torch.float32]
    assert out.loss_sum.dtype == torch.float32  # the loss itself stays in fp32


def test_bf16_trains_to_the_same_loss_as_fp32() -> None:
    """Tolerance: each logged loss within 2% (bf16 keeps ~3 significant digits)."""
    histories = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainerConfig(max_steps=12, batch_size=4, learning_rate=0.01, precision=precision, seed=5)
        result = fit(lora(), copy_examples(), [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
        histories[precision] = [record["loss"] for record in result.history]
    assert histories["bf16"] == pytest.approx(histories["fp32"], rel=0.02)
    assert histories["fp32"][-1] < histories["fp32"][0]  # it did learn


def test_bf16_training_holds_frozen_weights_in_bf16_and_gives_them_back() -> None:
    objective = lora()
    frozen = {n: p.detach().clone() for n, p in objective.named_parameters() if not p.requires_grad}
    adapters = [m for m in objective.modules() if hasattr(m, "cast_input_dtype_enabled")]
    seen: list[set[tuple[bool, torch.dtype]]] = []
    upcasts: list[set[bool]] = []

    def on_log(record: dict) -> None:
        seen.append({(p.requires_grad, p.dtype) for p in objective.parameters()})
        upcasts.append({m.cast_input_dtype_enabled for m in adapters})

    cfg = TrainerConfig(max_steps=2, batch_size=4, learning_rate=0.01, precision="bf16")
    fit(objective, copy_examples(8), copy_examples(4), cfg, Accelerator(cpu=True), pad_id=0,
        on_log=on_log, show_progress=False)
    # During training: frozen weights bf16, trainable ones (and so AdamW's state) fp32.
    assert seen == [{(False, torch.bfloat16), (True, torch.float32)}] * 2
    # peft's upcast of adapter inputs (undone by autocast at once) is off during training only.
    assert adapters and upcasts == [{False}] * 2 and {m.cast_input_dtype_enabled for m in adapters} == {True}
    after = dict(objective.named_parameters())
    for name, before in frozen.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], before), name


def test_fp32_training_leaves_the_frozen_weights_alone() -> None:
    objective = lora()
    seen: list[set[torch.dtype]] = []
    cfg = TrainerConfig(max_steps=1, batch_size=4, precision="fp32")
    fit(objective, copy_examples(4), [], cfg, Accelerator(cpu=True), pad_id=0,
        on_log=lambda record: seen.append({p.dtype for p in objective.parameters()}), show_progress=False)
    assert seen == [{torch.float32}]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    batch = collate_training(copy_examples(4), pad_id=0)
    results = []
    for checkpointing in (False, True):
        objective = lora()
        if checkpointing:
            enable_gradient_checkpointing(objective.model)
        objective.train()
        out = objective(**batch)
        out.loss_sum.backward()
        grads = {n: p.grad for n, p in objective.named_parameters() if p.requires_grad}
        results.append((out.loss_sum.item(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads and grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)
