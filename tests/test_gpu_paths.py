"""The CUDA training paths, as far as a CPU can exercise them.

Each choice (attention implementation, fused AdamW, Liger's loss, offload, compile, the token budget)
is decided by a plain function of the settings and the device: those decisions are checked for a CUDA
device here, and every path that can also run on the CPU trains to the same losses as the default one.
Tolerance: fp32; losses within 1e-5 relative (another summation order at most), compile within 1e-4.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from conftest import build_model, train_tiny_run
from test_precision import copy_examples, lora

from tunewright.config import BackendConfig, TrainerConfig, load_config
from tunewright.errors import ConfigError
from tunewright.kernels import forwards, gpu_training
from tunewright.kernels.gpu_training import (
    attention_implementation_for,
    decoder_layers,
    liger_loss_applies,
    optimizer_options,
)
from tunewright.kernels.training import training_kernels
from tunewright.model import load_base_model
from tunewright.train import fit, split_micro_batches

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Pretend exactly these optional packages are installed."""
    packages: set[str] = set()
    monkeypatch.setattr(gpu_training, "package_installed", lambda name: name in packages)
    return packages


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwards, "_warned", set())


def train_losses(objective: torch.nn.Module | None = None, **settings: object) -> list[float]:
    cfg = TrainerConfig(max_steps=6, batch_size=4, learning_rate=0.01, precision="fp32", seed=5, **settings)
    result = fit(objective or lora(), copy_examples(), [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    return [record["loss"] for record in result.history]


# --- attention ----------------------------------------------------------------------------------------

def test_auto_attention_is_flash_on_cuda_only_when_installed(installed: set[str]) -> None:
    assert attention_implementation_for("auto", CPU) == "sdpa"
    assert attention_implementation_for("auto", CUDA) == "sdpa"
    installed.add("flash_attn")
    assert attention_implementation_for("auto", CUDA) == "flash_attention_2"
    assert attention_implementation_for("auto", CPU) == "sdpa"
    assert attention_implementation_for("eager", CUDA) == "eager"


def test_flash_attention_where_it_cannot_run_is_one_line(installed: set[str]) -> None:
    with pytest.raises(ConfigError, match=r"backend\.attention: flash_attention_2 runs only on CUDA"):
        attention_implementation_for("flash_attention_2", CPU)
    with pytest.raises(ConfigError, match=r"backend\.attention: flash_attention_2 needs the flash-attn package"):
        attention_implementation_for("flash_attention_2", CUDA)
    installed.add("flash_attn")
    assert attention_implementation_for("flash_attention_2", CUDA) == "flash_attention_2"


def test_backend_attention_reaches_the_loaded_model(tiny_model_dir) -> None:
    loaded = load_base_model(str(tiny_model_dir), BackendConfig(attention="eager"))
    assert loaded.model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"backend\.attention"):
        load_base_model(str(tiny_model_dir), BackendConfig(attention="flash_attention_2"))


def test_packed_training_with_eager_attention_keeps_rows_short_and_trains() -> None:
    """Without varlen attention a packed row is masked as a whole: same losses as sdpa's per-sample path."""
    eager = lora()
    eager.model.get_base_model().set_attn_implementation("eager")
    assert train_losses(eager) == pytest.approx(train_losses(), rel=1e-5)


# --- optimizer ----------------------------------------------------------------------------------------

def test_adamw_is_fused_on_cuda_only() -> None:
    assert optimizer_options(CUDA) == {"fused": True}
    assert optimizer_options(CPU) == {}


def test_fused_adamw_takes_the_same_step() -> None:
    """torch's fused AdamW (the CUDA choice) runs on CPU too: the same update as the default one."""
    steps = []
    for options in ({}, {"fused": True}):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(8, 8))
        optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01, **options)
        for _ in range(3):
            (weight ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        steps.append(weight.detach())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-6, atol=1e-6)


# --- the LM-head loss ---------------------------------------------------------------------------------

def test_liger_is_chosen_on_cuda_when_installed(installed: set[str]) -> None:
    assert not liger_loss_applies("auto", CUDA)
    installed.add("liger_kernel")
    assert liger_loss_applies("auto", CUDA) and liger_loss_applies("liger", CUDA)
    assert not liger_loss_applies("chunked", CUDA)
    assert not liger_loss_applies("auto", CPU)


def test_liger_asked_for_where_it_cannot_run_falls_back_with_one_warning(
        installed: set[str], caplog: pytest.LogCaptureFixture) -> None:
    objective = lora()
    objective.fused_loss = "liger"  # what api.train passes from trainer.fused_loss
    with caplog.at_level(logging.WARNING, logger="tunewright.kernels"):
        liger = train_losses(objective)
    warnings = [record.message for record in caplog.records if "fused_loss" in record.message]
    assert warnings == ["trainer.fused_loss: liger off: it needs CUDA and this run is on cpu; using the stock path"]
    assert liger == train_losses()


def test_fused_loss_is_validated_by_the_schema() -> None:
    base = {"input_features": [{"name": "a"}], "output_features": [{"name": "b"}]}
    with pytest.raises(Exception, match=r"trainer\.fused_loss"):
        load_config({**base, "trainer": {"fused_loss": "triton"}})


# --- micro-batches by a token budget ------------------------------------------------------------------

def test_token_budget_cuts_micro_batches() -> None:
    lengths = [5, 5, 5, 12, 3, 3]
    assert split_micro_batches([[0, 1, 2, 3, 4, 5]], 4) == [[0, 1, 2, 3], [4, 5]]
    # at most 10 tokens each; the 12-token sample goes alone
    assert split_micro_batches([[0, 1, 2, 3, 4, 5]], 4, lengths, 10) == [[0, 1], [2], [3], [4, 5]]
    # the sample count still caps a micro-batch
    assert split_micro_batches([[4, 5, 4, 5]], 2, lengths, 100) == [[4, 5], [4, 5]]


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_trains_to_the_same_loss(packing: bool) -> None:
    """Each step's loss is normalised by the whole window's target tokens, so cutting it differently changes nothing."""
    budget = train_losses(batch_tokens=12, packing=packing)
    assert budget == pytest.approx(train_losses(packing=packing), rel=1e-5)


# --- memory and compile -------------------------------------------------------------------------------

def test_activation_offload_trains_to_the_same_loss() -> None:
    offloaded = lora()
    offloaded.model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    assert train_losses(offloaded, gradient_checkpointing="offload") == pytest.approx(train_losses(), rel=1e-5)


def test_offload_is_validated_by_the_schema() -> None:
    base = {"input_features": [{"name": "a"}], "output_features": [{"name": "b"}]}
    assert load_config({**base, "trainer": {"gradient_checkpointing": "offload"}}).trainer.gradient_checkpointing
    with pytest.raises(Exception, match=r"trainer\.gradient_checkpointing"):
        load_config({**base, "trainer": {"gradient_checkpointing": "disk"}})


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo's own probe
def test_compile_trains_to_the_same_loss_and_leaves_a_plain_model() -> None:
    objective = lora()
    compiled = train_losses(objective, compile=True, packing=False)
    assert compiled == pytest.approx(train_losses(packing=False), rel=1e-4)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(objective.model))


def test_compile_without_layers_warns_and_trains(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tunewright.kernels"):
        assert gpu_training.compile_decoder_layers(torch.nn.Linear(2, 2)) == 0
    assert "trainer.compile off" in caplog.text


# --- no CPU-only path on a GPU ------------------------------------------------------------------------

def test_no_cpu_path_is_entered_for_a_cuda_device() -> None:
    """The CPU forwards (dropout, RMSNorm, oneDNN linears) replace module forwards; for CUDA none may."""
    objective = lora()
    modules = list(objective.modules())
    before = [module.__dict__.get("forward") for module in modules]
    with training_kernels(objective, "fp32", CUDA, packing=False):
        assert [module.__dict__.get("forward") for module in modules] == before
    with training_kernels(objective, "fp32", CPU, packing=False):
        assert [module.__dict__.get("forward") for module in modules] != before


def test_a_model_without_a_layer_list_has_no_decoder_layers() -> None:
    assert decoder_layers(build_model(259)) and not decoder_layers(torch.nn.Sequential())


def test_the_settings_reach_a_run(tiny_model_dir, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """trainer.fused_loss, batch_tokens and gradient_checkpointing: offload through api.train, end to end."""
    trainer = {"max_steps": 2, "precision": "fp32", "learning_rate": 0.01, "seed": 3}
    plain = train_tiny_run(tiny_model_dir, tmp_path / "plain", trainer, rows_repeat=2)
    with caplog.at_level(logging.WARNING, logger="tunewright.kernels"):
        tuned = train_tiny_run(tiny_model_dir, tmp_path / "tuned", {**trainer, "fused_loss": "liger",
                               "batch_tokens": 16, "gradient_checkpointing": "offload"}, rows_repeat=2)
    assert "trainer.fused_loss: liger off" in caplog.text

    def losses(run) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "training_log.jsonl").read_text().splitlines()]

    assert losses(tuned) == pytest.approx(losses(plain), rel=1e-5)
