"""CPU linear layers whose frozen weights are pre-packed once for oneDNN: generation and fp32 training.

`F.linear` on CPU hands fp32 matmuls to MKL's sgemm, which re-packs the whole weight at every
call. At the few rows of a decode step (one new token per prompt) that packing costs more than
the multiply: all of SmolLM2-135M's linear layers at 16 rows take 73 ms that way and 28 ms with
weights packed once (`bench/cpu_kernels.py`). The packed kernel is a true fp32 kernel (error
against fp64 3.8e-7, sgemm's 2.5e-7); only its summation order differs. bf16 weights (on CPUs
with bf16 units) already go through oneDNN and keep the same bits, about 10% faster packed.

The packed copy of each weight is kept with its layer until the weight changes (another tensor,
or an in-place update such as an optimizer step or merging an adapter), so repeated generation
calls (a server) pack once. It costs a second copy of the linear weights in memory.

The same holds in fp32 training, where PyTorch's matmuls all go to MKL: on AMD CPUs MKL does not
use AVX-512 and runs at half of oneDNN's fp32 rate (`bench/matmul_limit.py`). `packed_frozen_linears`
runs every frozen linear layer (a LoRA model's whole base) through oneDNN for the forward pass and
for the input gradient, with a second copy packed transposed; trainable layers keep `F.linear`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from tunewright import speed

BATCH_HINT = 16  # rows the packed layout is tuned for: a decode step's batch
TRAINING_BATCH_HINT = 512  # and for a training micro-batch's tokens

# layer -> (what the weight was when packed: storage, version, dtype, shape), packed weight
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[object, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def _weight_key(weight: torch.Tensor) -> tuple[object, ...]:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


def packable(weight: torch.Tensor) -> bool:
    """A CPU weight oneDNN runs natively: fp32, or bf16 on a CPU with bf16 units."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and speed.cpu_has_native_bf16())


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
    if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
            or x.dtype != self.weight.dtype or not packable(self.weight) or x.device != self.weight.device:
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

    Subclasses of nn.Linear and adapter layers keep their own forward (an adapter's frozen base
    layer is a plain nn.Linear, and is packed). Anything that needs gradients falls back to
    `F.linear`, so training inside this context is unaffected.
    """
    try:
        layers = prepack(model)
    except RuntimeError:  # a oneDNN build that cannot pack these weights: keep F.linear
        layers = []
    for layer in layers:
        layer.forward = MethodType(_prepacked_forward, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _PackedFrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W, both matmuls on packed weights: x W^T forward, g W backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, packed_transposed: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.packed_transposed = packed_transposed
        return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_x = torch.ops.mkldnn._linear_pointwise(grad, ctx.packed_transposed, None, "none", [], "")
        return grad_x, None, None, None


# layer -> (packed, packed transposed) while a packed_frozen_linears context holds it (for lm_loss)
_training_packed: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()


def packed_matmuls(layer: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                 Callable[[torch.Tensor], torch.Tensor]] | None:
    """(x -> x W^T, g -> g W) on `layer`'s packed weights, if a packed_frozen_linears context holds
    it and `x` is what it trains on; None otherwise. For code that multiplies by a layer's weight
    itself (the fused LM-head loss). The bias is not included."""
    weights = _training_packed.get(layer)
    if weights is None or not isinstance(layer, nn.Linear) or not _trains_on_packed_weights(layer, x):
        return None
    packed, transposed = weights

    def forward(rows: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], ""))

    def backward(grad: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(grad, transposed, None, "none", [], ""))

    return forward, backward


def _trains_on_packed_weights(layer: nn.Linear, x: torch.Tensor) -> bool:
    """fp32 on CPU, outside autocast, with a frozen weight and bias (only the input may need a gradient)."""
    frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    return (frozen and x.dtype == layer.weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


@contextmanager
def packed_frozen_linears(model: nn.Module) -> Iterator[None]:
    """While inside, `model`'s frozen fp32 CPU `nn.Linear` layers compute through packed weights.

    For fp32 training on CPU. The packed copies (two per layer) are dropped on exit. Anything
    else (bf16 autocast, a trainable weight, another device) takes the layer's own forward.
    """
    layers = [module for module in model.modules() if type(module) is nn.Linear and not module.weight.requires_grad
              and packable(module.weight) and module.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            packed = {layer: (torch.ops.mkldnn._reorder_linear_weight(layer.weight, TRAINING_BATCH_HINT),
                              torch.ops.mkldnn._reorder_linear_weight(layer.weight.t().contiguous(),
                                                                      TRAINING_BATCH_HINT))
                      for layer in layers}
    except RuntimeError:  # a oneDNN build that cannot pack these weights: keep F.linear
        packed = {}

    def forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not _trains_on_packed_weights(layer, x):
            return F.linear(x, layer.weight, layer.bias)
        weights = packed[layer]
        # 2-D through the function: oneDNN returns a view for 3-D inputs, and a custom function's
        # output must not be a view (adapters such as AdaLoRA add to it in place).
        flat = cast(torch.Tensor, _PackedFrozenLinear.apply(  # type: ignore[no-untyped-call]
            x.reshape(-1, x.shape[-1]), weights[0], weights[1], layer.bias))
        return flat.view(*x.shape[:-1], flat.shape[-1])

    for layer in packed:
        layer.forward = MethodType(forward, layer)  # type: ignore[method-assign]
        _training_packed[layer] = packed[layer]
    try:
        yield
    finally:
        for layer in packed:
            del layer.forward
            _training_packed.pop(layer, None)
