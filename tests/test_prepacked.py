"""Linear layers on pre-packed oneDNN weights: the same fp32 maths, packed once, inference only.

Tolerance: fp32 outputs within 1e-5 of `F.linear`'s relative to their norm (only the summation
order differs); bf16 (on CPUs with bf16 units) bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright import prepacked, speed
from tunewright.config import GenerationSettings
from tunewright.generate import generate_ids
from tunewright.prepacked import packable, packed_frozen_linears, packed_weight, prepacked_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
CPU_HAS_NATIVE_BF16 = speed.cpu_has_native_bf16()  # read before conftest's fixture turns it off


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("rows", [1, 16, 70])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 200)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode(), prepacked_linears(layer):
        packed = layer(x)
    assert relative_error(packed, F.linear(x, layer.weight, layer.bias)) < 1e-5


@pytest.mark.skipif(not CPU_HAS_NATIVE_BF16, reason="this CPU has no bf16 units")
def test_packed_bf16_linear_keeps_the_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    layer = nn.Linear(96, 200, bias=False).to(torch.bfloat16)
    assert packable(layer.weight)
    x = torch.randn(16, 96).to(torch.bfloat16)
    with torch.inference_mode(), prepacked_linears(layer):
        packed = layer(x)
    assert torch.equal(packed, F.linear(x, layer.weight))


def test_weights_are_packed_once_and_again_after_they_change() -> None:
    layer = nn.Linear(8, 4)
    first = packed_weight(layer)
    assert packed_weight(layer) is first
    with torch.no_grad():
        layer.weight.add_(1.0)  # in place (an optimizer step, merging an adapter)
    second = packed_weight(layer)
    assert second is not first
    layer.weight.data = torch.zeros(4, 8)  # another tensor
    assert packed_weight(layer) is not second
    x = torch.randn(3, 8)
    with torch.inference_mode(), prepacked_linears(layer):
        assert torch.allclose(layer(x), layer.bias.expand(3, 4))


def test_gradients_and_other_layers_keep_f_linear(tiny_model) -> None:
    """Inside the context, anything that needs a gradient still trains; the forward is restored after."""
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with prepacked_linears(layer):
        layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert "forward" not in vars(layer)
    with prepacked_linears(tiny_model):
        patched = [m for m in tiny_model.modules() if "forward" in vars(m)]
    assert patched and all(type(m) is nn.Linear for m in patched)
    assert not [m for m in tiny_model.modules() if "forward" in vars(m)]


def test_generation_on_cpu_runs_on_packed_weights(tiny_model, tokenizer) -> None:
    prepacked._packed.clear()
    generate_ids(tiny_model, tokenizer, tokenizer(["hi", "cats"])["input_ids"], GenerationSettings(max_new_tokens=3))
    linears = [m for m in tiny_model.modules() if type(m) is nn.Linear]
    assert linears and all(layer in prepacked._packed for layer in linears)


def lora_model(model: nn.Module) -> nn.Module:
    from tunewright.adapters import attach_adapter
    from tunewright.config import AdapterConfig

    torch.manual_seed(1)
    wrapped = attach_adapter(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    for name, parameter in wrapped.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero: move it so every gradient is non-trivial
            torch.nn.init.normal_(parameter, std=0.1)
    return wrapped


def loss_and_gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fp32_training_through_packed_frozen_linears_matches_f_linear(tiny_model) -> None:
    """A LoRA step's loss and adapter gradients (the frozen base on packed weights) match F.linear's.

    Tolerance: loss within 1e-6 relative, each gradient within 1e-5 of its norm (fp32, another
    summation order).
    """
    model = lora_model(tiny_model).train()
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = loss_and_gradients(model, ids)
    with packed_frozen_linears(model):
        patched = [m for m in model.modules() if "forward" in vars(m)]
        packed_loss, packed_grads = loss_and_gradients(model, ids)
    assert patched and all(type(m) is nn.Linear and not m.weight.requires_grad for m in patched)
    assert not [m for m in model.modules() if "forward" in vars(m)]  # restored
    assert packed_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in plain_grads.items():
        assert (packed_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_packed_frozen_linears_leave_other_cases_to_f_linear() -> None:
    trainable, frozen = nn.Linear(8, 4), nn.Linear(8, 4).requires_grad_(False)
    model = nn.Sequential(trainable, nn.ReLU(), nn.Linear(4, 4).requires_grad_(False), frozen)
    with packed_frozen_linears(model):
        assert "forward" not in vars(trainable) and "forward" in vars(frozen)
        x = torch.randn(2, 3, 8, requires_grad=True)
        out = frozen(x)
        out += 1.0  # adapters such as AdaLoRA add to the base output in place
        out.sum().backward()
        assert torch.allclose(x.grad, frozen.weight.sum(0).expand(2, 3, 8), atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training keeps autocast's F.linear
            assert frozen(x).dtype == torch.bfloat16


def test_fit_in_fp32_on_cpu_trains_through_packed_weights(monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    import importlib

    from accelerate import Accelerator

    from tunewright.config import TrainerConfig
    from tunewright.data import IGNORE_INDEX, Example
    from tunewright.objective import LanguageModelObjective

    train = importlib.import_module("tunewright.train")  # the module (the package exports a function `train`)
    entered = []

    def spy(model: nn.Module):  # noqa: ANN202
        entered.append(model)
        return packed_frozen_linears(model)

    monkeypatch.setattr(train, "packed_frozen_linears", spy)
    examples = [Example(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], prompt_len=2)] * 4
    objective = LanguageModelObjective(lora_model(tiny_model))
    cfg = TrainerConfig(max_steps=2, batch_size=2, learning_rate=0.01, precision="fp32")
    result = train.fit(objective, examples, [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    assert entered == [objective] and result.steps == 2
    assert all(record["loss"] is not None for record in result.history)


def test_fused_lm_head_loss_runs_on_the_packed_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the context, the fused loss multiplies by the packed head: same loss and gradient (fp32)."""
    from tunewright import lm_loss

    torch.manual_seed(0)
    head = nn.Linear(24, 300, bias=False).requires_grad_(False)
    targets = torch.randint(0, 300, (40,))
    hidden = torch.randn(40, 24)

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        leaf = hidden.clone().requires_grad_()
        loss, _ = lm_loss.linear_cross_entropy(leaf, head, targets, want_correct=False)
        loss.backward()
        return loss.item(), leaf.grad

    plain_loss, plain_grad = loss_and_grad()
    used = []

    def spy(layer: nn.Module, x: torch.Tensor):  # noqa: ANN202
        used.append(prepacked.packed_matmuls(layer, x))
        return used[-1]

    monkeypatch.setattr(lm_loss, "packed_matmuls", spy)
    with packed_frozen_linears(head):
        packed_loss, packed_grad = loss_and_grad()
    assert used and used[-1] is not None
    assert packed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert (packed_grad - plain_grad).norm() <= 1e-5 * plain_grad.norm()
