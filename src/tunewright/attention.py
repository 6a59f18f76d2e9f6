"""Variable-length attention for packed rows on SDPA: each sample attends only within its own span.

For SDPA, transformers turns restarting position ids into a block-diagonal causal mask, but SDPA
still computes the whole (W, W) score matrix of a packed row and then masks it: for a row of k
samples that is about k times the attention work of the samples alone (a fifth of a SmolLM2
training step at 4 samples per row, measured). Given the sample boundaries (`cu_seq_lens_q`, the
keyword flash-attention varlen reads on CUDA), this runs causal SDPA on each sample's span instead,
so one micro-batch can be one row of any length with no padding at all. Everything else (padded
batches, generation with a cache) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunewright.adapters import base_model

VARLEN_SDPA = "tunewright_varlen_sdpa"
# Implementations that attend per sample given the boundaries ("sdpa" is switched to VARLEN_SDPA
# for packed training). Any other one computes a packed row's whole (W, W) scores under a mask,
# so its rows are kept short: the mask and the scores grow with the square of the row.
VARLEN_CAPABLE = {"sdpa", VARLEN_SDPA, "flash_attention_2", "flash_attention_3"}
MASKED_ROW_TOKENS = 512


def varlen_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per sample of a packed row (batch of one, no cache); plain SDPA for anything else.

    query (1, H, W, D), key/value (1, Hkv, W, D); returns (1, W, H, D) like transformers' SDPA.
    """
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    edges = bounds.tolist()
    lengths = [end - start for start, end in zip(edges[:-1], edges[1:], strict=True)]
    # Under CPU autocast SDPA would run in bf16, and PyTorch's CPU flash-attention backward is
    # much slower in bf16 than in fp32 (1.97 vs 1.12 ms forward + backward for a 111-token span of
    # 9 heads): it was a quarter of a bf16 training step. fp32 is also the more accurate of the two.
    fp32_on_cpu = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if fp32_on_cpu:
        query, key, value = query.float(), key.float(), value.float()
    # split, not slicing: its backward concatenates the spans' gradients instead of adding one
    # zero-filled full-size gradient per span.
    spans = zip(torch.split(query, lengths, dim=2), torch.split(key, lengths, dim=2),
                torch.split(value, lengths, dim=2), strict=True)
    # No mask: SDPA applies the causal pattern within each span itself (is_causal).
    with torch.autocast("cpu", enabled=False) if fp32_on_cpu else nullcontext():
        pieces = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in spans]
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
# Padded batches under this implementation still get SDPA's usual mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)


def varlen_kwargs(cu_seq_lens: torch.Tensor) -> dict[str, Any]:
    """The transformers keywords that mark a packed row's sample boundaries (flash-attention's names)."""
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def packed_row_capacity(model: nn.Module) -> int | None:
    """Tokens per packed row: no limit (one row per micro-batch) with varlen attention, else 512."""
    implementation = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None)
    return None if implementation in VARLEN_CAPABLE else MASKED_ROW_TOKENS


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Switch an SDPA model to per-sample attention for packed training; restore it afterwards.

    Flash-attention models read the same boundaries natively and are left as they are.
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    switch = getattr(base, "set_attn_implementation", None)
    if not callable(switch) or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    switch(VARLEN_SDPA)
    try:
        yield
    finally:
        switch("sdpa")
