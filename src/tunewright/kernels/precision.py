"""Training precision per device: `trainer.precision` resolved, bf16 autocast, and frozen weights held in bf16."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

from tunewright.kernels import switches

log = logging.getLogger(__name__)

MixedPrecision = Literal["no", "bf16"]
BF16_MIN_SPEEDUP = 1.2  # bf16 autocast also costs casts and rounding: pick it only when clearly faster


def mixed_precision_for(precision: str, device: torch.device) -> MixedPrecision:
    """Resolve `trainer.precision` for this device (the names are Accelerate's `mixed_precision`).

    `auto` picks bf16 autocast where bf16 matmuls are fast: CUDA with bf16, and CPUs with
    AVX512-BF16/AMX where a bf16 matmul measured at least 1.2x fp32 here; fp32 elsewhere.
    The weights stay in their loaded dtype either way.
    """
    if precision == "bf16":
        return "bf16"
    if precision == "fp32":
        return "no"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type != "cpu":
        return "no"
    return "bf16" if _cpu_auto_bf16(switches.setting(switches.CPU_BF16))[0] else "no"


def _bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a training-sized matmul on this CPU (medians of interleaved runs)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in pairs}
    for round_ in range(7):
        for dtype, (x, y) in pairs.items():
            started = time.perf_counter()
            torch.mm(x, y)
            if round_ >= 2:  # the first rounds warm oneDNN's kernel caches
                times[dtype].append(time.perf_counter() - started)
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])


@functools.cache
def _cpu_auto_bf16(forced: str) -> tuple[bool, str]:
    """(bf16?, why) for `precision: auto` on this CPU, decided and logged once per process (and setting)."""
    if forced != "auto":
        choice = (forced == "native", f"{switches.CPU_BF16}={forced}")
    elif not switches.cpu_has_native_bf16():
        choice = (False, "this CPU has no bf16 units (AVX512-BF16 or AMX)")
    else:
        speedup = _bf16_matmul_speedup()
        verdict = speedup >= BF16_MIN_SPEEDUP
        choice = (verdict, f"this CPU has bf16 units and a bf16 matmul measured {speedup:.2f}x fp32 "
                           f"({'at least' if verdict else 'below'} {BF16_MIN_SPEEDUP}x)")
    log.info("precision auto: %s on CPU, because %s", "bf16" if choice[0] else "fp32", choice[1])
    return choice


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


