"""fp32 training on CPU: the frozen linear layers multiply through oneDNN instead of MKL.

PyTorch's CPU build sends every fp32 matmul to MKL's sgemm, and on AMD CPUs MKL does not use
AVX-512: on a 2-core Zen 5 it runs at 186 GFLOP/s where oneDNN's fp32 kernel runs at 447
(`bench/matmul_limit.py`). A LoRA step's big matmuls are all on frozen weights (the base layers'
forward, their input gradient, the LM head), so `onednn_frozen_linears` runs those through
oneDNN's linear op: x W^T forward and g W backward, in fp32 (another summation order, the same
accuracy). Trainable layers (adapters, full fine-tuning) keep autograd's own matmuls.

On Intel CPUs MKL does use AVX-512, and there oneDNN's fp32 linear was slower (0.93x MKL for all
training linears on an AMX Xeon). So `auto` measures one training-sized linear both ways once per
process and takes oneDNN only where it is at least 1.05x MKL (`onednn_training_chosen`).

No second copy is kept. While training, each frozen weight that belongs to one layer only is
stored column-major (the same values and shape, `W.t().contiguous().t()`, replacing the row-major
tensor): oneDNN reads that layout without reordering in both directions, where a row-major weight
costs it a reorder at every forward call (a fifth more time for the forward pass of all
SmolLM2-135M layers in development measurements). The row-major layout is restored on
exit. A weight shared with another module (an LM head tied to the embeddings) keeps its layout.
Weights loaded memory-mapped (safetensors) stay mapped, so their pages still count in RSS next to
the re-laid copies: about +0.4 GiB peak RSS for SmolLM2-135M, still below Trainer's (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from tunewright.kernels import switches
from tunewright.kernels.forwards import instance_forwards
from tunewright.kernels.prepacked import onednn_usable, packable

log = logging.getLogger(__name__)

ONEDNN_MIN_SPEEDUP = 1.05  # the re-laid weights cost memory: take oneDNN only where it is clearly faster
Matmul = Callable[[torch.Tensor], torch.Tensor]

# the layers an onednn_frozen_linears context holds (read by the fused LM-head loss)
_active: weakref.WeakSet[nn.Linear] = weakref.WeakSet()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) on oneDNN; x is 2-D (oneDNN returns a view for more dimensions)."""
    return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W and b: both matmuls on oneDNN, only x gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _onednn_linear(grad, ctx.weight.t()), None, None


def _runs_on_onednn(layer: nn.Linear, x: torch.Tensor) -> bool:
    """fp32 on CPU outside autocast, with a frozen weight and bias (only x may need a gradient)."""
    frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    return (frozen and x.dtype == layer.weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def _forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _runs_on_onednn(layer, x):
        return F.linear(x, layer.weight, layer.bias)
    # 2-D through the function: a custom function's output must not be a view (adapters such as
    # AdaLoRA add to it in place), and oneDNN returns one for 3-D inputs.
    flat = cast(torch.Tensor, _FrozenLinear.apply(  # type: ignore[no-untyped-call]
        x.reshape(-1, x.shape[-1]), layer.weight, layer.bias))
    return flat.view(*x.shape[:-1], flat.shape[-1])


def onednn_matmuls(layer: nn.Module, x: torch.Tensor) -> tuple[Matmul, Matmul] | None:
    """(rows -> rows W^T, grad -> grad W) through oneDNN for a layer an onednn_frozen_linears context
    holds, when `x` is what it runs on oneDNN; else None. For code that multiplies by a layer's
    weight itself (the fused LM-head loss). The bias is not included."""
    if not isinstance(layer, nn.Linear) or layer not in _active or not _runs_on_onednn(layer, x):
        return None
    weight = layer.weight
    return (lambda rows: _onednn_linear(rows, weight)), (lambda grad: _onednn_linear(grad, weight.t()))


@contextmanager
def onednn_frozen_linears(model: nn.Module) -> Iterator[None]:
    """While inside, `model`'s frozen fp32 CPU `nn.Linear` layers multiply through oneDNN (fp32 training)."""
    owners = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    layers = [module for module in model.modules() if type(module) is nn.Linear and not module.weight.requires_grad
              and module.weight.dtype == torch.float32 and packable(module.weight)]
    relaid = [layer.weight for layer in layers if owners[id(layer.weight)] == 1 and layer.weight.is_contiguous()]
    try:
        for weight in relaid:
            weight.data = weight.data.t().contiguous().t()  # column-major, same values and shape
        _active.update(layers)
        with instance_forwards(layers, _forward):
            yield
    finally:
        for layer in layers:
            _active.discard(layer)
        for weight in relaid:
            weight.data = weight.data.contiguous()


def onednn_training_chosen() -> bool:
    """Whether fp32 CPU training runs its frozen linears on oneDNN: `TUNEWRIGHT_ONEDNN=on`, or `auto` where
    oneDNN measured at least 1.05x MKL on this CPU (once per process, logged)."""
    setting = switches.setting(switches.ONEDNN)
    if setting == "off" or not switches.kernels_enabled() or not onednn_usable():
        return False
    return setting == "on" or _measured_choice()


@functools.cache
def _measured_choice() -> bool:
    speedup = onednn_linear_speedup()
    chosen = speedup >= ONEDNN_MIN_SPEEDUP
    log.info("fp32 training linears on %s: a oneDNN linear measured %.2fx MKL's here (%s %.2fx)",
             "oneDNN" if chosen else "MKL", speedup, "at least" if chosen else "below", ONEDNN_MIN_SPEEDUP)
    return chosen


def onednn_linear_speedup() -> float:
    """MKL time / oneDNN time for a frozen linear's two training matmuls (x W^T, g W) at a training size,
    medians of interleaved runs after two warm-up rounds."""
    generator = torch.Generator().manual_seed(0)
    x, grad = torch.randn(480, 576, generator=generator), torch.randn(480, 1536, generator=generator)
    weight = torch.randn(1536, 576, generator=generator)
    column_major = weight.t().contiguous().t()  # the layout onednn_frozen_linears trains with

    def mkl() -> None:
        F.linear(x, weight)
        grad @ weight

    def onednn() -> None:
        _onednn_linear(x, column_major)
        _onednn_linear(grad, column_major.t())

    times: dict[str, list[float]] = {"mkl": [], "onednn": []}
    with torch.no_grad():
        for round_ in range(9):
            for name, run in (("mkl", mkl), ("onednn", onednn)):
                started = time.perf_counter()
                run()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - started)
    return statistics.median(times["mkl"]) / statistics.median(times["onednn"])
