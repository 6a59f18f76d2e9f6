"""CPU training speed-ups that keep the maths: a cheaper dropout mask, and reuse of freed memory.

Both were measured in a SmolLM2-135M LoRA step on 2 CPU cores (BENCHMARKS.md, "Speed"):
- `torch.nn.Dropout` draws one Bernoulli number per element from the CPU generator; at LoRA's
  60 dropouts per step that was 8% of the step. `fast_dropout` draws 16 bits per element instead
  (four per 64-bit draw) and keeps a 1-byte mask for the backward pass instead of a float one.
- glibc returns every freed block over 32 MiB (and the top of its heap) to the OS, so the LM head's
  (targets x vocabulary) tensors are page-faulted in afresh at every step. `reuse_freed_memory`
  lets glibc keep them.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

# glibc's mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
MASK_LEVELS = 1 << 16  # the dropout probability is rounded to a multiple of 1/65536


def reuse_freed_memory() -> bool:
    """Ask glibc to serve big tensors from its heap and keep freed memory for the next step.

    Process-wide and harmless elsewhere: returns False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def dropped_positions(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool tensor of `shape`, True with probability round(p * 65536) / 65536, from torch's CPU generator."""
    count = shape.numel()
    words = torch.randint(torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, ((count + 3) // 4,),
                          dtype=torch.int64)
    levels = words.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]
    return levels < torch.iinfo(torch.int16).min + round(p * MASK_LEVELS)


class _ScaledMask(torch.autograd.Function):
    """x / (1 - p) with the dropped positions zeroed; the backward pass applies the same mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return (x * scale).masked_fill_(dropped, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (dropped,) = ctx.saved_tensors
        return (grad * ctx.scale).masked_fill_(dropped, 0.0), None, None


class FastDropout(nn.Dropout):
    """nn.Dropout with the cheaper mask on CPU; elsewhere (CUDA's generator is fast) and in eval, nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        levels = round(self.p * MASK_LEVELS)
        if levels >= MASK_LEVELS:
            return x * 0.0
        # Scale by the probability actually drawn, so the expectation stays x exactly.
        dropped = dropped_positions(x.shape, self.p)
        return cast(torch.Tensor, _ScaledMask.apply(x, dropped, MASK_LEVELS / (MASK_LEVELS - levels)))  # type: ignore[no-untyped-call]


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[None]:
    """Run every nn.Dropout of `model` (LoRA's adapter-input dropouts, among others) as FastDropout.

    The modules are swapped back afterwards, so the model the caller holds is unchanged.
    """
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Dropout and child.p > 0]
    for parent, name, original in swapped:
        fast = FastDropout(original.p)
        fast.train(original.training)
        setattr(parent, name, fast)
    try:
        yield
    finally:
        for parent, name, original in swapped:
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
