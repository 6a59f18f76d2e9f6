"""Linear layers on pre-packed oneDNN weights: the same fp32 maths, packed once, inference only.

Tolerance: fp32 outputs within 1e-5 of `F.linear`'s relative to their norm (only the summation
order differs); bf16 (on CPUs with bf16 units) bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunewright.config import GenerationSettings
from tunewright.generate import generate_ids
from tunewright.kernels import prepacked
from tunewright.kernels.prepacked import packable, packed_weight, prepacked_linears

pytestmark = [
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)"),
    pytest.mark.cpu_only(reason="pre-packed oneDNN weights are a CPU inference path"),
]


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


def test_packed_bf16_linear_keeps_the_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16-units path, forced on any CPU (oneDNN emulates bf16 where the CPU has no such units)."""
    monkeypatch.setenv("TUNEWRIGHT_CPU_BF16", "native")
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

