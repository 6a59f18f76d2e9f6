"""Training speed paths for CUDA, each through its library's own switch.

- the attention implementation: transformers' `attn_implementation` (flash_attention_2 reads a packed
  row's sample boundaries natively);
- fused AdamW: torch's `fused=True` (one kernel for all parameters instead of one per tensor);
- the LM-head loss: Liger's fused linear cross-entropy (a Triton kernel) where it can run, else
  tunewright's chunked one (kernels/lm_loss.py);
- activation offload: torch's `save_on_cpu` hook for the tensors kept for the backward pass;
- torch.compile of each decoder layer (`nn.Module.compile`, in place).

Every choice is a plain function of the settings and the device, so the CPU suite checks each decision.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from tunewright.errors import ConfigError
from tunewright.kernels.forwards import fall_back

log = logging.getLogger(__name__)


@functools.cache
def package_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def attention_implementation_for(requested: str, device: torch.device) -> str:
    """The `attn_implementation` to load the model with, for backend.attention on `device`."""
    if requested == "flash_attention_2":
        if device.type != "cuda":
            raise ConfigError("backend.attention: flash_attention_2 runs only on CUDA; use auto or sdpa on this device")
        if not package_installed("flash_attn"):
            raise ConfigError("backend.attention: flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn); or use auto")
        return requested
    if requested != "auto":
        return requested
    return "flash_attention_2" if device.type == "cuda" and package_installed("flash_attn") else "sdpa"


def optimizer_options(device: torch.device) -> dict[str, Any]:
    """AdamW keywords: on CUDA the fused kernel, elsewhere torch's default (foreach) implementation."""
    return {"fused": True} if device.type == "cuda" else {}


def liger_loss_applies(setting: str, device: torch.device) -> bool:
    """Whether trainer.fused_loss runs Liger's kernel here; asked for where it cannot run: one warning."""
    if setting == "chunked":
        return False
    if device.type == "cuda" and package_installed("liger_kernel"):
        return True
    if setting == "liger":
        reason = ("the liger-kernel package is not installed (pip install 'tunewright[liger]')"
                  if device.type == "cuda" else f"it needs CUDA and this run is on {device.type}")
        fall_back("trainer.fused_loss: liger", reason)
    return False


def liger_linear_cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear,
                               targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy of `lm_head(hidden)` against `targets`, by Liger's fused kernel (no logits kept)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional: CUDA + the liger extra

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(lm_head.weight, hidden, targets, lm_head.bias)
    return cast(torch.Tensor, loss[0] if isinstance(loss, tuple) else loss)  # some releases add the z-loss


@contextmanager
def activation_offload(enabled: bool, device: torch.device) -> Iterator[None]:
    """Keep the tensors saved for the backward pass in CPU memory while inside (pinned for CUDA copies)."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
        yield


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers decoder (looking through a peft wrapper), or none."""
    from tunewright.model import base_model  # model.py imports this module

    get_decoder = getattr(base_model(model), "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place: one compiled graph, reused by every layer of the same shape.

    Returns how many layers were compiled (0, with one warning, for a model without a layer list).
    """
    layers = decoder_layers(model)
    if not layers:
        fall_back("trainer.compile", f"{type(model).__name__} has no decoder layer list to compile")
        return 0
    for layer in layers:
        layer.compile(dynamic=True)  # packed rows change length every step
    log.info("trainer.compile: %d decoder layers compiled on first use", len(layers))
    return len(layers)
