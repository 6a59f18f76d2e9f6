"""CPU inference through linear layers whose weights are pre-packed once for oneDNN.

`F.linear` on CPU hands fp32 matmuls to MKL's sgemm, which does not use AVX-512 on AMD CPUs,
and at the few rows of a decode step (one new token per prompt) it is slower still. All of
SmolLM2-135M's linear layers at 16 rows take 69 ms that way and 29 ms through oneDNN with
weights packed once (`bench/cpu_kernels.py`, `decode_linears`). The packed kernel is a true fp32
kernel (largest relative error against fp64 5.3e-7, sgemm's 2.6e-7); only its summation order
differs. bf16 weights (on CPUs with bf16 units) already go through oneDNN and keep the same
bits, about 1.3x faster packed.

The packed copy of each weight is kept with its layer until the weight changes (another tensor,
or an in-place update such as an optimizer step or merging an adapter), so repeated generation
calls (a server) pack once. It costs a second copy of the linear weights in memory.
fp32 training takes oneDNN too, without packed copies (onednn_training.py).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.kernels import switches
from tunewright.kernels.forwards import fall_back, instance_forwards

BATCH_HINT = 16  # rows the packed layout is tuned for: a decode step's batch

# layer -> (what the weight was when packed: storage, version, dtype, shape), packed weight
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[object, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def _weight_key(weight: torch.Tensor) -> tuple[object, ...]:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


@functools.cache
def onednn_linear_problem() -> str | None:
    """None when torch's private oneDNN linear ops (torch.ops.mkldnn, no public API) are there and give
    `F.linear`'s results, for packed and column-major weights alike; else what is wrong. Checked once."""
    ops = torch.ops.mkldnn
    for name in ("_linear_pointwise", "_reorder_linear_weight"):
        if not hasattr(ops, name):
            return f"torch {torch.__version__} has no torch.ops.mkldnn.{name}"
    generator = torch.Generator().manual_seed(0)
    weight, x, bias = (torch.randn(*shape, generator=generator) for shape in ((24, 40), (5, 40), (24,)))
    expected = F.linear(x, weight, bias)
    try:
        with torch.no_grad():
            packed = ops._reorder_linear_weight(weight, BATCH_HINT)
            results = [ops._linear_pointwise(x, w, bias, "none", [], "") for w in (packed, weight.t().contiguous().t())]
    except RuntimeError as error:
        return f"torch.ops.mkldnn linear failed ({str(error).splitlines()[0]})"
    if not all(torch.allclose(result, expected, rtol=1e-4, atol=1e-5) for result in results):
        return "torch.ops.mkldnn linear no longer gives F.linear's results"
    return None


def onednn_usable() -> bool:
    """oneDNN linear layers are switched on (switches.py) and torch's ops still behave (one warning if not)."""
    if not switches.onednn_enabled():
        return False
    problem = onednn_linear_problem()
    if problem is not None:
        fall_back("oneDNN linear layers", problem)
    return problem is None


def packable(weight: torch.Tensor) -> bool:
    """A CPU weight oneDNN runs natively: fp32, or bf16 on a CPU with bf16 units."""
    if weight.device.type != "cpu" or not onednn_usable():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and switches.cpu_has_native_bf16())


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight in oneDNN's blocked layout, packed again only if the weight changed."""
    key = _weight_key(layer.weight)
    cached = _packed.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        packed = cast(torch.Tensor, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), BATCH_HINT))
    _packed[layer] = (key, packed)
    return packed


def _prepacked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Inference only: no autograd through the packed kernel, and inputs must match the weight.
    # (packable() was checked when the context was entered; a weight moved off the CPU since is not.)
    if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
            or x.dtype != self.weight.dtype or self.weight.device.type != "cpu" or x.device != self.weight.device:
        return F.linear(x, self.weight, self.bias)
    return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(x, packed_weight(self), self.bias, "none", [], ""))


def prepack(model: nn.Module) -> list[nn.Linear]:
    """Pack every plain `nn.Linear` of `model` that oneDNN can run; returns those layers."""
    layers = [module for module in model.modules() if type(module) is nn.Linear and packable(module.weight)]
    for layer in layers:
        packed_weight(layer)
    return layers


@contextmanager
def prepacked_linears(model: nn.Module) -> Iterator[None]:
    """Run `model`'s plain linear layers through their packed weights while inside (CPU inference).

    A model on another device has no packable weights, so there the context changes nothing.

    Subclasses of nn.Linear and adapter layers keep their own forward (an adapter's frozen base
    layer is a plain nn.Linear, and is packed). Anything that needs gradients falls back to
    `F.linear`, so training inside this context is unaffected.
    """
    try:
        layers = prepack(model)
    except RuntimeError:  # a oneDNN build that cannot pack these weights: keep F.linear
        layers = []
    with instance_forwards(layers, _prepacked_forward):
        yield



inference_kernels = prepacked_linears  # the inference entry (generation, label scoring, serving)
