"""How a speed path changes library behaviour it has no extension point for: per-instance forwards
installed and removed exactly, and one warning line when a path falls back to the stock code."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import MethodType
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tunewright.kernels")

_warned: set[str] = set()


def fell_back(path: str) -> bool:
    """Whether speed path `path` has fallen back in this process (paths that stay off after one failure)."""
    return path in _warned


def fall_back(path: str, reason: str) -> None:
    """Say once per process that speed path `path` runs the stock code instead, and why."""
    if path not in _warned:
        _warned.add(path)
        log.warning("%s off: %s; using the stock path", path, reason)


@contextmanager
def instance_forwards(modules: Sequence[nn.Module], forward: Callable[[Any, torch.Tensor], torch.Tensor]
                      ) -> Iterator[None]:
    """Give each module `forward` as its own forward while inside; put back whatever it had before
    (another context's forward, or none), so such contexts nest.

    A forward that someone else installed meanwhile (transformers' `kernelize` at `train()`/`eval()`
    replaces or removes instance forwards) is theirs: it is left in place, not overwritten.
    """
    previous = [module.__dict__.get("forward") for module in modules]
    installed = []
    for module in modules:
        module.forward = MethodType(forward, module)
        installed.append(module.__dict__["forward"])
    try:
        yield
    finally:
        for module, before, ours in zip(modules, previous, installed, strict=True):
            if module.__dict__.get("forward") is not ours:
                continue  # replaced (or removed) by someone else while inside: keep theirs
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
