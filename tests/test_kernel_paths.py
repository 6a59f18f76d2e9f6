"""Every CPU speed path, forced on or off on whatever CPU runs the suite, against the stock path.

- Each path gives the stock path's losses (fp32: oneDNN on and off; bf16 as a CPU with bf16 units
  takes it; packed rows with per-sample attention).
- A path whose entry check fails falls back to the stock code with one warning, and then gives
  exactly the stock losses.
- A model whose forwards someone else replaces during training (transformers' `kernelize`, run by
  `train()`/`eval()` since transformers 5.25) still trains, and keeps their forwards.
- `precision: auto` logs what it chose and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MethodType

import pytest
import torch
from accelerate import Accelerator
from conftest import build_model
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, GenerationSettings, TrainerConfig
from tunewright.data import IGNORE_INDEX, Example
from tunewright.errors import ConfigError
from tunewright.generate import generate_ids
from tunewright.kernels import cpu_training, forwards, precision, prepacked, switches
from tunewright.objective import LanguageModelObjective
from tunewright.train import fit

pytestmark = pytest.mark.cpu_only(reason="it forces each CPU speed path on and off")

CPU = torch.device("cpu")
StepHook = Callable[[int, int], None]


def examples() -> list[Example]:
    generator = torch.Generator().manual_seed(7)
    rows = []
    for length in (9, 14, 6, 11, 8, 13):
        ids = torch.randint(3, 250, (length,), generator=generator).tolist()
        rows.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 3 + ids[3:], prompt_len=3))
    return rows


def lora_objective() -> LanguageModelObjective:
    model = build_model(259, seed=0)
    torch.manual_seed(1)
    return LanguageModelObjective(attach_adapter(model, AdapterConfig(r=4, alpha=8, dropout=0.0)))


def train_losses(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], precision_setting: str = "fp32",
                 packing: bool = False, hook: Callable[[LanguageModelObjective], StepHook] | None = None
                 ) -> list[float]:
    for name in (switches.KERNELS, switches.ONEDNN, switches.CPU_BF16):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    objective = lora_objective()
    cfg = TrainerConfig(max_steps=3, batch_size=3, learning_rate=0.01, precision=precision_setting,
                        packing=packing, seed=0)
    result = fit(objective, examples(), [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False,
                 after_optimizer_step=hook(objective) if hook else None)
    return [record["loss"] for record in result.history]


STOCK = {switches.KERNELS: "off"}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("onednn", ["auto", "on", "off"])
def test_fp32_paths_give_the_stock_losses(monkeypatch: pytest.MonkeyPatch, onednn: str, packing: bool) -> None:
    ours = train_losses(monkeypatch, {switches.ONEDNN: onednn, switches.CPU_BF16: "emulated"}, packing=packing)
    stock = train_losses(monkeypatch, STOCK, packing=packing)
    assert ours == pytest.approx(stock, rel=1e-4)


@pytest.mark.parametrize("packing", [False, True])
def test_bf16_paths_as_a_cpu_with_bf16_units_takes_them(monkeypatch: pytest.MonkeyPatch, packing: bool) -> None:
    """`auto` on a CPU with bf16 units: autocast, frozen weights held in bf16, bf16 span attention."""
    ours = train_losses(monkeypatch, {switches.CPU_BF16: "native"}, "auto", packing)
    stock = train_losses(monkeypatch, {**STOCK, switches.CPU_BF16: "native"}, "bf16", packing)
    fp32 = train_losses(monkeypatch, STOCK, "fp32", packing)
    assert ours == pytest.approx(stock, rel=2e-2)
    assert ours != fp32  # bf16 really ran


def test_a_failed_onednn_check_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """As if torch had dropped its private oneDNN ops: one warning, then exactly the stock losses."""
    monkeypatch.setattr(prepacked, "onednn_linear_problem", lambda: "torch has no torch.ops.mkldnn._linear_pointwise")
    monkeypatch.setattr(cpu_training, "_norm_matches_stock", lambda module: False)
    monkeypatch.setattr(forwards, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="tunewright.kernels"):
        fallen_back = train_losses(monkeypatch, {switches.CPU_BF16: "emulated"})
        train_losses(monkeypatch, {switches.CPU_BF16: "emulated"})  # a second run warns no more
    stock = train_losses(monkeypatch, STOCK)
    assert fallen_back == stock
    messages = [record.getMessage() for record in caplog.records]
    assert sum("oneDNN linear layers off" in message for message in messages) == 1
    assert sum("fast_rms_norm off" in message for message in messages) == 1


def test_the_real_onednn_check_passes_here() -> None:
    if torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        assert prepacked.onednn_linear_problem() is None


def test_a_bad_switch_value_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(switches.ONEDNN, "maybe")
    with pytest.raises(ConfigError, match=r"TUNEWRIGHT_ONEDNN='maybe': use one of auto, on, off"):
        switches.onednn_enabled()


def norms_and_linears(objective: nn.Module) -> list[nn.Module]:
    return [module for module in objective.modules() if isinstance(module, (LlamaRMSNorm, nn.Linear))]


def kernelize_every_step(objective: LanguageModelObjective) -> StepHook:
    """transformers' own case: `kernels.kernelize` with no kernel for this device puts every layer's
    class forward back, removing the instance forwards tunewright installed."""
    kernels = pytest.importorskip("kernels")

    def hook(step: int, total: int) -> None:
        with kernels.use_kernel_mapping({}, inherit_mapping=False):
            kernels.kernelize(objective.model, mode=kernels.Mode.TRAINING, device="cpu")

    return hook


def install_foreign_forwards(objective: LanguageModelObjective) -> StepHook:
    """Someone else's forward on every norm and linear layer, installed mid-training."""

    def hook(step: int, total: int) -> None:
        if step == 1:
            for module in norms_and_linears(objective):
                module.forward = MethodType(type(module).forward, module)

    return hook


@pytest.mark.parametrize("hook", [kernelize_every_step, install_foreign_forwards])
def test_forwards_replaced_during_training_are_tolerated(monkeypatch: pytest.MonkeyPatch, hook) -> None:
    seen: dict[str, LanguageModelObjective] = {}

    def remember(objective: LanguageModelObjective) -> StepHook:
        seen["objective"] = objective
        return hook(objective)

    losses = train_losses(monkeypatch, {switches.CPU_BF16: "emulated"}, hook=remember)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    modules = norms_and_linears(seen["objective"])
    if hook is kernelize_every_step:  # kernelize removed ours; nothing of ours was put back over it
        assert all("forward" not in module.__dict__ for module in modules)
    else:  # theirs stayed
        assert all(module.__dict__["forward"].__func__ is type(module).forward for module in modules)


def test_instance_forwards_nest_and_restore_exactly() -> None:
    layer = nn.Linear(4, 4)
    marker = MethodType(lambda self, x: x, layer)
    layer.forward = marker
    with forwards.instance_forwards([layer], lambda self, x: x * 2):
        with forwards.instance_forwards([layer], lambda self, x: x * 3):
            assert torch.equal(layer(torch.ones(4)), torch.full((4,), 3.0))
        assert torch.equal(layer(torch.ones(4)), torch.full((4,), 2.0))
    assert layer.__dict__["forward"] is marker


@pytest.mark.parametrize("kernels_setting", ["auto", "off"])
def test_generation_with_and_without_packed_weights_gives_the_same_tokens(
        monkeypatch: pytest.MonkeyPatch, tokenizer, kernels_setting: str) -> None:
    monkeypatch.setenv(switches.KERNELS, kernels_setting)
    model = build_model(len(tokenizer))
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]]
    settings = GenerationSettings(max_new_tokens=6)
    ours = generate_ids(model, tokenizer, prompts, settings)
    monkeypatch.setenv(switches.KERNELS, "off")
    assert ours == generate_ids(model, tokenizer, prompts, settings)


def test_precision_auto_logs_its_choice_and_why(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(switches.CPU_BF16, raising=False)
    monkeypatch.setattr(switches, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_bf16_matmul_speedup", lambda: 0.8)  # bf16 units, but slower here
    precision._cpu_auto_bf16.cache_clear()
    with caplog.at_level(logging.INFO, logger="tunewright.kernels.precision"):
        assert precision.mixed_precision_for("auto", CPU) == "no"
    assert "precision auto: fp32 on CPU, because this CPU has bf16 units and a bf16 matmul measured 0.80x" \
        in caplog.text
    monkeypatch.setattr(precision, "_bf16_matmul_speedup", lambda: 2.0)
    precision._cpu_auto_bf16.cache_clear()
    assert precision.mixed_precision_for("auto", CPU) == "bf16"
    precision._cpu_auto_bf16.cache_clear()


def test_the_bf16_measurement_runs() -> None:
    assert precision._bf16_matmul_speedup() > 0
