"""fp32 training's frozen linear layers through oneDNN: the same maths as F.linear, in place.

Tolerance: fp32; losses within 1e-6 relative and gradients within 1e-5 of their norm (another
summation order).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright.kernels import onednn_training, switches
from tunewright.kernels.onednn_training import onednn_frozen_linears

pytestmark = [
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)"),
    pytest.mark.cpu_only(reason="oneDNN linear layers are a CPU path"),
]


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


def test_fp32_lora_step_matches_f_linear(tiny_model) -> None:
    """A LoRA step's loss and adapter gradients (the frozen base on oneDNN) match F.linear's."""
    model = lora_model(tiny_model).train()
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = loss_and_gradients(model, ids)
    with onednn_frozen_linears(model):
        patched = [m for m in model.modules() if "forward" in vars(m)]
        packed_loss, packed_grads = loss_and_gradients(model, ids)
    assert patched and all(type(m) is nn.Linear and not m.weight.requires_grad for m in patched)
    assert not [m for m in model.modules() if "forward" in vars(m)]  # restored
    assert packed_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in plain_grads.items():
        assert (packed_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_other_cases_keep_f_linear() -> None:
    trainable, frozen = nn.Linear(8, 4), nn.Linear(8, 4).requires_grad_(False)
    model = nn.Sequential(trainable, nn.ReLU(), nn.Linear(4, 4).requires_grad_(False), frozen)
    with onednn_frozen_linears(model):
        assert "forward" not in vars(trainable) and "forward" in vars(frozen)
        x = torch.randn(2, 3, 8, requires_grad=True)
        out = frozen(x)
        out += 1.0  # adapters such as AdaLoRA add to the base output in place
        out.sum().backward()
        assert torch.allclose(x.grad, frozen.weight.sum(0).expand(2, 3, 8), atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training keeps autocast's F.linear
            assert frozen(x).dtype == torch.bfloat16


def test_fit_in_fp32_on_cpu_trains_through_onednn(monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    from accelerate import Accelerator

    from tunewright.config import TrainerConfig
    from tunewright.data import IGNORE_INDEX, Example
    from tunewright.objective import LanguageModelObjective

    train = importlib.import_module("tunewright.train")  # the module (the package exports a function `train`)
    kernels_training = importlib.import_module("tunewright.kernels.training")
    entered = []

    def spy(model: nn.Module):  # noqa: ANN202
        entered.append(model)
        return onednn_frozen_linears(model)

    monkeypatch.setattr(kernels_training, "onednn_frozen_linears", spy)
    monkeypatch.setenv(switches.ONEDNN, "on")  # whatever this CPU's MKL measures
    examples = [Example(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], prompt_len=2)] * 4
    objective = LanguageModelObjective(lora_model(tiny_model))
    cfg = TrainerConfig(max_steps=2, batch_size=2, learning_rate=0.01, precision="fp32")
    result = train.fit(objective, examples, [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    assert entered == [objective] and result.steps == 2
    assert all(record["loss"] is not None for record in result.history)


def test_fused_lm_head_loss_multiplies_through_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the context, the fused loss multiplies by the head through oneDNN: same loss and gradient."""
    from tunewright.kernels import lm_loss

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
        used.append(onednn_training.onednn_matmuls(layer, x))
        return used[-1]

    monkeypatch.setattr(lm_loss, "onednn_matmuls", spy)
    with onednn_frozen_linears(head):
        packed_loss, packed_grad = loss_and_grad()
    assert used and used[-1] is not None
    assert packed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert (packed_grad - plain_grad).norm() <= 1e-5 * plain_grad.norm()


def test_weights_are_relaid_in_place_and_restored(tiny_model) -> None:
    """Inside: frozen weights column-major (same values, no copy kept); after: row-major again, equal."""
    tiny_model.config.tie_word_embeddings = True
    tiny_model.tie_weights()  # a head shared with the embeddings keeps its layout
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    layer = tiny_model.model.layers[0].mlp.down_proj
    tiny_model.requires_grad_(False)
    with onednn_frozen_linears(tiny_model):
        assert layer.weight.stride() == (1, layer.weight.shape[0])
        assert tiny_model.lm_head.weight.is_contiguous()
        assert torch.equal(layer.weight, before["model.layers.0.mlp.down_proj.weight"])
    for name, parameter in tiny_model.named_parameters():
        assert parameter.is_contiguous() and torch.equal(parameter, before[name]), name


def test_contexts_nest_and_restore_each_others_forward() -> None:
    """Generating inside training (packed inference forwards) hands the layers back to training's forward."""
    from tunewright.kernels.prepacked import prepacked_linears

    layer = nn.Linear(8, 4).requires_grad_(False)
    with onednn_frozen_linears(layer):
        training_forward = vars(layer)["forward"]
        with torch.inference_mode(), prepacked_linears(layer):
            assert vars(layer)["forward"] is not training_forward
        assert vars(layer)["forward"] is training_forward
    assert "forward" not in vars(layer)


@pytest.mark.parametrize(("setting", "speedup", "chosen"), [
    ("auto", 2.0, True),   # AMD with AVX-512: MKL skips it
    ("auto", 0.92, False),  # Intel: MKL is as fast or faster
    ("on", 0.92, True),
    ("off", 2.0, False),
])
def test_training_takes_onednn_only_where_it_beats_mkl(monkeypatch: pytest.MonkeyPatch, setting: str,
                                                       speedup: float, chosen: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(switches.ONEDNN, setting)
    monkeypatch.setattr(onednn_training, "onednn_linear_speedup", lambda: speedup)
    onednn_training._measured_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="tunewright.kernels"):
        assert onednn_training.onednn_training_chosen() is (chosen and torch.backends.mkldnn.is_available())
    onednn_training._measured_choice.cache_clear()
    if setting == "auto":
        assert f"measured {speedup:.2f}x MKL" in caplog.text


def test_the_measurement_compares_the_same_products() -> None:
    """A real measurement here: a positive ratio, and oneDNN's two products equal MKL's."""
    assert onednn_training.onednn_linear_speedup() > 0
    x, weight = torch.randn(8, 6), torch.randn(5, 6)
    column_major = weight.t().contiguous().t()
    assert torch.allclose(onednn_training._onednn_linear(x, column_major), F.linear(x, weight), atol=1e-5)
