"""One entry for fit(): every training speed path that applies, entered together and left in reverse."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from tunewright.kernels import switches
from tunewright.kernels.attention import (
    MASKED_ROW_TOKENS,
    NATIVE_VARLEN,
    attention_implementation,
    packed_attention,
    packed_row_capacity,
)
from tunewright.kernels.cpu_training import fast_dropout, fast_rms_norm, reuse_freed_memory
from tunewright.kernels.gpu_training import activation_offload, compile_decoder_layers, decoder_layers
from tunewright.kernels.onednn_training import onednn_frozen_linears, onednn_training_chosen
from tunewright.kernels.precision import autocast_for, frozen_weights_in_bf16, mixed_precision_for


@dataclass
class TrainingKernels:
    """What the training loop needs to know of the paths chosen."""

    autocast: AbstractContextManager[object]  # enter around every forward pass (training and validation)
    row_capacity: int | None  # tokens per packed row (None: one row per micro-batch)
    precision: str  # "bf16" or "fp32", as resolved for this device


@contextmanager
def compiled_layers(model: nn.Module) -> Iterator[None]:
    """trainer.compile: each decoder layer compiled while training; the saved and served model is the plain one."""
    compiled = compile_decoder_layers(model)
    try:
        yield
    finally:
        for layer in decoder_layers(model)[:compiled]:
            layer._compiled_call_impl = None  # what nn.Module.compile set; None is its "not compiled" value


@contextmanager
def training_kernels(objective: nn.Module, precision: str, device: torch.device, packing: bool,
                     compile_layers: bool = False, offload_activations: bool = False) -> Iterator[TrainingKernels]:
    """Enter the speed paths for training `objective` (a model plus its loss) on `device`.

    - packing: per-sample attention through transformers' attention registry (kernels/attention.py);
    - bf16: autocast, with frozen weights held in bf16 (precision.py);
    - on CPU: a cheaper dropout mask, a leaner frozen RMSNorm, freed memory kept by glibc, and in
      fp32 the frozen linear layers on oneDNN where it beats MKL (cpu_training.py, onednn_training.py);
    - asked for by the settings, on any device: torch.compile of the decoder layers and activation
      offload to CPU memory (gpu_training.py).

    `TUNEWRIGHT_KERNELS=off` keeps only what the settings ask for (packing, precision) on the stock
    code (switches.py). Everything entered here is restored on exit, in reverse order.
    """
    fast = switches.kernels_enabled()
    bf16 = mixed_precision_for(precision, device) == "bf16"
    model = cast(nn.Module, getattr(objective, "model", objective))
    with ExitStack() as stack:
        row_capacity = None
        if packing:
            if fast:
                stack.enter_context(packed_attention(model))
                row_capacity = packed_row_capacity(model)
            else:  # without varlen attention transformers masks a packed row as a whole: keep rows short
                row_capacity = None if attention_implementation(model) in NATIVE_VARLEN else MASKED_ROW_TOKENS
        if fast:
            stack.enter_context(frozen_weights_in_bf16(objective, precision, device))
        if compile_layers:
            stack.enter_context(compiled_layers(model))
        stack.enter_context(activation_offload(offload_activations, device))
        # The CPU paths replace module forwards, which torch.compile would trace through or break on:
        # a compiled layer fuses its own dropout, norms and linears instead.
        if fast and device.type == "cpu" and not compile_layers:
            stack.enter_context(reuse_freed_memory())
            stack.enter_context(fast_dropout(objective))
            stack.enter_context(fast_rms_norm(objective))
            if not bf16 and onednn_training_chosen():
                stack.enter_context(onednn_frozen_linears(objective))
        yield TrainingKernels(autocast_for(precision, device), row_capacity, "bf16" if bf16 else "fp32")
