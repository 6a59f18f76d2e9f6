"""Which speed paths run on this machine, and how to force each one.

Every CPU path can be chosen by an environment variable, so CI on one CPU also runs the paths
another CPU would take (tests/test_kernel_paths.py):

- `TUNEWRIGHT_KERNELS=off`: none of tunewright's speed paths; transformers' and torch's stock code.
- `TUNEWRIGHT_CPU_BF16=native|emulated`: treat the CPU as having bf16 units (AVX512-BF16/AMX) or not.
  `native` on a CPU without them still computes correctly (oneDNN emulates bf16), only slowly.
- `TUNEWRIGHT_ONEDNN=off`: no oneDNN linear layers (packed inference weights, fp32 frozen linears);
  `on`: fp32 training's frozen linears on oneDNN without measuring it against MKL first.

Unset (or `auto`), each follows what the CPU has; `precision: auto` also measures bf16 against fp32
once per process before it picks bf16 (precision.py).
"""

from __future__ import annotations

import os

import torch

from tunewright.errors import ConfigError

KERNELS = "TUNEWRIGHT_KERNELS"
CPU_BF16 = "TUNEWRIGHT_CPU_BF16"
ONEDNN = "TUNEWRIGHT_ONEDNN"
_CHOICES = {KERNELS: ("auto", "off"), CPU_BF16: ("auto", "native", "emulated"), ONEDNN: ("auto", "on", "off")}


def setting(name: str) -> str:
    """The variable's value, `auto` when unset; an unknown value is refused in one line."""
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in _CHOICES[name]:
        raise ConfigError(f"environment variable {name}={value!r}: use one of {', '.join(_CHOICES[name])}")
    return value


def kernels_enabled() -> bool:
    return setting(KERNELS) != "off"


def bf16_forced() -> bool:
    """Whether TUNEWRIGHT_CPU_BF16 names the answer (no probing, no measuring)."""
    return setting(CPU_BF16) != "auto"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), unless forced.

    Without it oneDNN emulates bf16 and a matmul runs about 5x slower than in fp32.
    """
    forced = setting(CPU_BF16)
    if forced != "auto":
        return forced == "native"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def onednn_enabled() -> bool:
    """oneDNN linear layers: on where torch was built with oneDNN, unless switched off."""
    return kernels_enabled() and setting(ONEDNN) != "off" and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
