"""CPU training speed-ups that keep the maths: a cheaper dropout mask, a leaner RMSNorm, reuse of freed memory.

All were measured in a SmolLM2-135M LoRA step on 2 CPU cores (BENCHMARKS.md, "Speed"):
- `torch.nn.Dropout` draws one Bernoulli number per element from the CPU generator; at LoRA's
  60 dropouts per step that was 8% of the step. `fast_dropout` draws 16 bits per element instead
  (four per 64-bit draw) and applies it as a 0/1 factor, which is cheaper than masked_fill.
- glibc returns every freed block over 32 MiB (and the top of its heap) to the OS, so the LM head's
  (targets x vocabulary) tensors are page-faulted in afresh at every step. `reuse_freed_memory`
  lets glibc keep them while training, and puts glibc's defaults back afterwards.
- Autograd through transformers' RMSNorm keeps four activation-sized tensors per norm and makes a
  dozen passes over them; `fast_rms_norm` runs a frozen-weight norm as one autograd function.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from tunewright.kernels.forwards import fall_back, instance_forwards

# glibc's mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
_GLIBC_DEFAULT_BYTES = 128 * 1024  # both thresholds' defaults (mallopt(3))
MASK_LEVELS = 1 << 16  # the dropout probability is rounded to a multiple of 1/65536


def _glibc_mallopt() -> Any | None:
    """glibc's mallopt, or None where the C library is not glibc (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  # glibc only: musl has no such symbol
        return libc.mallopt
    except (OSError, AttributeError):
        return None


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While inside, glibc serves big tensors from its heap and keeps freed memory for the next step.

    mallopt is process-wide, so its thresholds go back to glibc's defaults on exit. Yields whether
    the setting took (False where the C library is not glibc: nothing changes there).
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        fall_back("reuse_freed_memory", "the C library is not glibc")
        yield False
        return
    took = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    try:
        yield took
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_BYTES)


def _levels_and_cut(shape: torch.Size, p: float) -> tuple[torch.Tensor, int]:
    """16 random bits per element (four per 64-bit draw from torch's CPU generator), and the level
    below which an element is dropped: probability round(p * 65536) / 65536."""
    count = shape.numel()
    words = torch.randint(torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, ((count + 3) // 4,),
                          dtype=torch.int64)
    levels = words.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]
    return levels, torch.iinfo(torch.int16).min + round(p * MASK_LEVELS)


def dropped_positions(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool tensor of `shape`, True where an element is dropped."""
    levels, cut = _levels_and_cut(shape, p)
    return levels < cut


def kept_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0 where an element is dropped, else 1, as `dtype`: the complement of `dropped_positions`
    from the same draws.

    On CPU, multiplying by a 0/1 float tensor is much cheaper than `masked_fill` with a bool mask,
    and bool -> float much slower than the same bytes read as uint8 -> float.
    """
    levels, cut = _levels_and_cut(shape, p)
    return (levels >= cut).view(torch.uint8).to(dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout with the cheaper mask on CPU; elsewhere (CUDA's generator is fast) and in eval, nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        levels = round(self.p * MASK_LEVELS)
        if levels >= MASK_LEVELS:
            return x * 0.0
        # Scale by the probability actually drawn, so the expectation stays x exactly. Autograd
        # keeps the 0/1 mask for the backward pass; a 0/1 factor changes no bits of x * scale.
        return x * kept_mask(x.shape, self.p, x.dtype) * (MASK_LEVELS / (MASK_LEVELS - levels))


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[None]:
    """Run every nn.Dropout of `model` (LoRA's adapter-input dropouts, among others) as FastDropout.

    The modules are swapped back afterwards, so the model the caller holds is unchanged.
    """
    swapped = [(parent, name, child, FastDropout(child.p)) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Dropout and child.p > 0]
    for parent, name, original, fast in swapped:
        fast.train(original.training)
        setattr(parent, name, fast)
    try:
        yield
    finally:
        for parent, name, original, fast in swapped:
            if getattr(parent, name, None) is not fast:
                continue  # someone else put another module there meanwhile: theirs stays
            original.train(fast.training)
            setattr(parent, name, original)


class _FrozenRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, `weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(x.dtype)`, for a frozen weight.

    The forward pass gives the same bits as transformers' module. Autograd through that module keeps
    four (N, H) tensors and makes about a dozen passes over them; this keeps x alone and recomputes
    (gradients equal to ~1e-7; 1.3x faster forward + backward, `bench/cpu_kernels.py`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, inverse_rms, weight)
        return weight * (x32 * inverse_rms).to(x.dtype)  # not in place: x32 is x itself in fp32

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, inverse_rms, weight = ctx.saved_tensors
        # The module's autograd rounds the normalised input's gradient to x's dtype first: so do we.
        grad_normalised = (grad * weight).to(x.dtype).float()
        x32 = x.float()
        # d/dx of x * r(x), r = (mean(x²) + eps)^-1/2:  r * g - x * r³ * mean(g * x)
        projection = (grad_normalised * x32).mean(-1, keepdim=True).mul_(inverse_rms.pow(3))
        grad_x = grad_normalised.mul_(inverse_rms).sub_(x32 * projection)
        return grad_x.to(x.dtype), None, None


def _code_signature(function: Any) -> tuple[Any, ...] | None:
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    # The docstring is a constant too; two copies of one function differ only there.
    return code.co_code, code.co_names, tuple(c for c in code.co_consts if not isinstance(c, str))


def _is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether `module` runs Llama's RMSNorm forward (transformers copies it into ~140 models)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and _code_signature(type(module).forward) == _code_signature(LlamaRMSNorm.forward))


def _fast_rms_norm_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = cast(nn.Parameter, module.weight)
    if weight.requires_grad or not torch.is_grad_enabled() or hidden_states.device.type != "cpu":
        return cast(torch.Tensor, type(module).forward(module, hidden_states))
    return cast(torch.Tensor, _FrozenRMSNorm.apply(hidden_states, weight, module.variance_epsilon))  # type: ignore[no-untyped-call]


_checked_norm_classes: dict[type, bool] = {}


def _norm_matches_stock(module: nn.Module) -> bool:
    """Whether `_FrozenRMSNorm` gives this norm class's own forward, checked once per class on a small input."""
    cls = type(module)
    if cls not in _checked_norm_classes:
        weight = cast(nn.Parameter, module.weight)
        x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        with torch.no_grad():
            stock = cls.forward(module, x)
            ours = _FrozenRMSNorm.apply(x, weight.detach(), module.variance_epsilon)  # type: ignore[no-untyped-call]
        _checked_norm_classes[cls] = torch.allclose(stock.float(), ours.float(), rtol=1e-5, atol=1e-6)
    return _checked_norm_classes[cls]


@contextmanager
def fast_rms_norm(model: nn.Module) -> Iterator[None]:
    """Run every Llama-style RMSNorm of `model` through `_FrozenRMSNorm` while its weight is frozen on CPU.

    A trainable norm weight (full fine-tuning), no_grad and other devices keep the module's own forward.
    The instances' forward is overridden, and the override removed afterwards. On entry each norm
    class is checked to still compute what `_FrozenRMSNorm` does; if not, the stock forward runs.
    """
    try:
        norms = [module for module in model.modules() if _is_llama_rms_norm(module)]
    except ImportError:  # transformers moved LlamaRMSNorm: nothing to compare against
        fall_back("fast_rms_norm", "transformers has no LlamaRMSNorm to compare with")
        norms = []
    if norms and not all(_norm_matches_stock(module) for module in norms):
        fall_back("fast_rms_norm", "transformers' RMSNorm no longer computes what it expects")
        norms = []
    with instance_forwards(norms, _fast_rms_norm_forward):
        yield
