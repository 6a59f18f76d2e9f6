"""The CPU dropout keeps nn.Dropout's maths (rate, expectation, the same mask forward and back)."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig
from tunewright.cpu_speed import MASK_LEVELS, FastDropout, dropped_positions, fast_dropout, reuse_freed_memory


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
def test_reuse_freed_memory_is_accepted_by_glibc() -> None:
    assert reuse_freed_memory() is True
    assert reuse_freed_memory() is True  # idempotent
