"""The CPU speed-ups keep the maths: nn.Dropout's (rate, expectation, one mask forward and back), RMSNorm's."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig
from tunewright.kernels.cpu_training import (
    MASK_LEVELS,
    FastDropout,
    dropped_positions,
    fast_dropout,
    fast_rms_norm,
    reuse_freed_memory,
)

pytestmark = pytest.mark.cpu_only(reason="the CPU-only dropout/RMSNorm speed paths")


def test_dropped_positions_have_the_requested_rate() -> None:
    torch.manual_seed(0)
    dropped = dropped_positions(torch.Size((400, 500)), 0.05)
    assert dropped.shape == (400, 500) and dropped.dtype == torch.bool
    # 200k Bernoulli(0.05) draws: the standard error of the rate is 0.0005.
    assert abs(dropped.float().mean().item() - 0.05) < 0.002
    assert not dropped_positions(torch.Size((1000,)), 0.0).any()
    assert dropped_positions(torch.Size((7, 3)), 0.5).shape == (7, 3)  # sizes that are not a multiple of 4


def test_fast_dropout_keeps_the_expectation_and_masks_the_gradient() -> None:
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    x = torch.full((300, 400), 2.0, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(y.mean().item() - 2.0) < 0.02  # inverted dropout: E[y] = x
    assert torch.allclose(y[kept], torch.tensor(2.0 * MASK_LEVELS / (MASK_LEVELS - round(0.1 * MASK_LEVELS))))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the backward pass uses the forward's mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_equals_scaling_then_zeroing_the_dropped_positions(dtype) -> None:
    """The 0/1-factor form gives the very bits of `(x * scale).masked_fill(dropped, 0)`, forward and back."""
    x = torch.randn(37, 53).to(dtype).requires_grad_()
    grad = torch.randn(37, 53).to(dtype)
    scale = MASK_LEVELS / (MASK_LEVELS - round(0.1 * MASK_LEVELS))
    torch.manual_seed(3)
    dropped = dropped_positions(torch.Size((37, 53)), 0.1)
    torch.manual_seed(3)
    y = FastDropout(0.1).train()(x)
    y.backward(grad)
    assert y.dtype == dtype
    assert torch.equal(y, (x.detach() * scale).masked_fill(dropped, 0.0))
    assert torch.equal(x.grad, (grad * scale).masked_fill(dropped, 0.0))


def test_fast_dropout_is_reproducible_and_off_in_eval() -> None:
    dropout = FastDropout(0.3).train()
    x = torch.randn(50, 60)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(first, dropout(x))
    assert torch.equal(dropout.eval()(x), x)


def test_fast_dropout_swaps_the_adapter_dropouts_and_restores_them(tiny_model) -> None:
    model = attach_adapter(tiny_model, AdapterConfig(r=4, alpha=8, dropout=0.1))
    originals = [m for m in model.modules() if type(m) is nn.Dropout]
    assert originals  # LoRA's input dropouts
    with fast_dropout(model):
        assert not any(type(m) is nn.Dropout for m in model.modules())
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == len(originals)
    assert [m for m in model.modules() if type(m) is nn.Dropout] == originals


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_is_accepted_by_glibc_and_scoped() -> None:
    with reuse_freed_memory() as took, reuse_freed_memory() as nested:
        assert took is True and nested is True  # nests
    # glibc's defaults are back: a freed block over 128 KiB goes back to the OS at once (mmap'ed).
    with reuse_freed_memory() as took:
        assert took is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm])
def test_fast_rms_norm_gives_the_module_forward_bits_and_its_gradient(norm_class, dtype) -> None:
    torch.manual_seed(0)
    norm = norm_class(48, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    grad = torch.randn(2, 5, 48).to(dtype)
    expected_input = x.clone()

    def output_and_input_grad() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        out.backward(grad)
        return out.detach(), leaf.grad

    plain_out, plain_grad = output_and_input_grad()
    with fast_rms_norm(norm):
        assert "forward" in vars(norm)
        fast_out, fast_grad = output_and_input_grad()
    assert "forward" not in vars(norm)  # restored
    assert torch.equal(fast_out, plain_out)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert torch.equal(x, expected_input)  # the input is not normalised in place (fp32: x.float() is x)


def test_fast_rms_norm_leaves_trainable_weights_no_grad_and_other_norms_alone() -> None:
    norm = LlamaRMSNorm(16)  # weight requires grad: a full fine-tune trains it
    gemma = GemmaRMSNorm(16)  # (1 + weight): another formula
    model = nn.Sequential(norm, gemma)
    with fast_rms_norm(model):
        assert "forward" not in vars(gemma)
        out = norm(torch.randn(3, 16))
        out.sum().backward()
        assert norm.weight.grad is not None  # the module's own forward ran
        norm.weight.requires_grad_(False)
        with torch.no_grad():
            assert torch.equal(norm(torch.ones(2, 16)), LlamaRMSNorm.forward(norm, torch.ones(2, 16)))
