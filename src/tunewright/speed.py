"""Training speed switches: mixed precision per device, and gradient checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

from tunewright.adapters import base_model

MixedPrecision = Literal["no", "bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without it oneDNN emulates bf16 and a matmul runs about 5x slower than in fp32
    (bench/train_speed.py measures both), so autocast would only cost time.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def mixed_precision_for(precision: str, device: torch.device) -> MixedPrecision:
    """Resolve `trainer.precision` for this device (the names are Accelerate's `mixed_precision`).

    `auto` picks bf16 autocast where bf16 matmuls are fast (CUDA with bf16, CPUs with
    AVX512-BF16/AMX) and fp32 elsewhere. The weights stay in their loaded dtype either way.
    """
    if precision == "bf16":
        return "bf16"
    if precision == "fp32":
        return "no"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The context that runs a training forward pass at the resolved precision.

    Our own autocast rather than `Accelerator(mixed_precision=...)`: Accelerate keeps one
    process-wide state that refuses a second, different setting, so one process could not train
    twice with different precisions. The loss is computed in fp32 either way (objective.py).
    """
    if mixed_precision_for(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def frozen_weights_in_bf16(module: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Under bf16 autocast, hold `module`'s frozen fp32 parameters in bf16 while inside; restore them after.

    Autocast casts a frozen weight again at every matmul (its cast cache keeps only weights that
    require gradients), and fp32 embeddings and norm weights keep the residual stream and its
    elementwise work in fp32. With the frozen weights in bf16 the whole stream is bf16. Trainable
    parameters, and so the optimizer, stay fp32. peft's adapters would upcast their bf16 input to
    their fp32 weights only for autocast to cast it straight back, so that cast is off meanwhile.
    The fp32 originals are put back untouched on exit, so evaluation, saving and export after
    training see exactly the loaded weights. Measured in BENCHMARKS.md ("Speed", Zen 5).
    """
    if mixed_precision_for(precision, device) != "bf16":
        yield
        return
    originals = [(parameter, parameter.data) for parameter in module.parameters()
                 if not parameter.requires_grad and parameter.dtype == torch.float32]
    # peft tuner layers (any kind) that carry the switch; Any because nn.Module does not declare it.
    adapters: list[Any] = [layer for layer in module.modules() if getattr(layer, "cast_input_dtype_enabled", False)]
    try:
        for parameter, data in originals:
            parameter.data = data.to(torch.bfloat16)
        for layer in adapters:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data
        for layer in adapters:
            layer.cast_input_dtype_enabled = True


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing works with frozen embeddings (LoRA) without forcing the inputs
    to require gradients.
    """
    base: Any = base_model(model)  # a transformers model: nn.Module's typing does not know these attributes
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
