"""Variable-length attention for packed rows on SDPA: each sample attends only within its own span.

For SDPA, transformers turns restarting position ids into a block-diagonal causal mask, but SDPA
still computes the whole (W, W) score matrix of a packed row and then masks it: for a row of k
samples that is about k times the attention work of the samples alone (a fifth of a SmolLM2
training step at 4 samples per row, measured). Given the sample boundaries (`cu_seq_lens_q`, the
keyword flash-attention varlen reads on CUDA), this runs causal SDPA on each sample's span instead,
so one micro-batch can be one row of any length with no padding at all. Everything else (padded
batches, generation with a cache) goes to transformers' own SDPA function unchanged.

On CUDA in half precision the row goes instead to torch's own varlen flash attention
(`torch.nn.attention.varlen`) in one call: no per-sample kernels and no host sync per layer.

Under bf16 autocast on CPU the spans go through `_BF16SpanAttention` instead: PyTorch's CPU
flash-attention kernel is slow in bf16 (its backward above all), and in fp32 it was still more than a
quarter of a LoRA training step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunewright.kernels.forwards import fall_back, fell_back
from tunewright.model import base_model

VARLEN_SDPA = "tunewright_varlen_sdpa"
# Implementations that attend per sample given the boundaries ("sdpa" is switched to VARLEN_SDPA
# for packed training). Any other one computes a packed row's whole (W, W) scores under a mask,
# so its rows are kept short: the mask and the scores grow with the square of the row.
NATIVE_VARLEN = {"flash_attention_2", "flash_attention_3"}  # read the boundaries themselves
VARLEN_CAPABLE = {"sdpa", VARLEN_SDPA, *NATIVE_VARLEN}
MASKED_ROW_TOKENS = 512


@contextmanager
def _fp32_matmuls_on_bf16_units() -> Iterator[None]:
    """Let oneDNN run fp32 matmuls with bf16 multiplies (fp32 accumulation and output).

    Only for tensors whose values are bf16 already: their products are exact in bf16 units, so the
    result is what an fp32 matmul gives, about twice as fast on a CPU with bf16 units.
    """
    matmul = getattr(torch.backends.mkldnn, "matmul", None)  # a runtime property module (torch >= 2.9)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        fall_back("bf16 multiplies for fp32 attention matmuls", f"torch {torch.__version__} has no such setting")
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _visible_keys(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(length, length) bool: query i sees key j <= i, and with a sliding window only j > i - window
    (transformers' sliding-window mask)."""
    visible = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
    return visible.triu_(1 - window) if window is not None else visible


def _build_future_mask(length: int, group: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(group * length, length): 0 where a query sees the key, else -inf (grouped heads stacked)."""
    hidden = ~_visible_keys(length, window, device)
    return torch.zeros(length, length, device=device).masked_fill_(hidden, float("-inf")).repeat(group, 1)


_cached_future_mask = functools.lru_cache(maxsize=16)(_build_future_mask)


def _future_mask(length: int, group: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Spans of up to 512 tokens reuse their mask across the layers of a step (a few MB at most)."""
    return (_cached_future_mask if length <= 512 else _build_future_mask)(length, group, window, device)


def sliding_window(kwargs: dict[str, Any], lengths: list[int]) -> int | None:
    """The window transformers passes to a sliding-window layer, if some span is longer than it."""
    window = kwargs.get("sliding_window")
    return window if window is not None and max(lengths) > window else None


class _BF16SpanAttention(torch.autograd.Function):
    """Causal attention within each span of a packed row, with bf16 matmuls where they keep the accuracy.

    Scores, softmax and the gradient of the probabilities are fp32 (from bf16 inputs, so their
    matmuls can run on bf16 units exactly); P @ V and the three gradient matmuls take bf16 inputs
    (oneDNN accumulates in fp32): the roundings of PyTorch's own bf16 flash-attention kernel, at
    about 2x the speed of its fp32 one and 3x its bf16 one (`bench/cpu_kernels.py`). Grouped-query
    heads share their key/value head as one (kv_heads, group * span, head_dim) batch, so keys and
    values are never repeated.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                scale: float, window: int | None = None) -> torch.Tensor:
        # query (1, H, W, D), key/value (1, Hkv, W, D) -> (1, W, H, D) in bf16
        heads, width, dim = query.shape[1:]
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q16, k16, v16 = (t[0].to(torch.bfloat16) for t in (query, key, value))
        q32, k32 = q16.float(), k16.float()
        out = torch.empty(width, heads, dim, dtype=torch.bfloat16, device=query.device)
        probabilities = []
        start = 0
        with _fp32_matmuls_on_bf16_units():
            for length in lengths:
                span = slice(start, start + length)
                q_by_kv_head = q32[:, span].reshape(kv_heads, group * length, dim)
                scores = torch.baddbmm(_future_mask(length, group, window, query.device), q_by_kv_head,
                                       k32[:, span].transpose(1, 2), alpha=scale)
                p16 = torch.softmax(scores, -1, out=scores).to(torch.bfloat16)
                out[span] = torch.bmm(p16, v16[:, span]).view(heads, length, dim).transpose(0, 1)
                probabilities.append(p16)
                start += length
        ctx.save_for_backward(q16, k16, v16, out)
        ctx.probabilities, ctx.lengths, ctx.scale = probabilities, lengths, scale
        ctx.dtypes = query.dtype, key.dtype, value.dtype
        return out.unsqueeze(0)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        with torch.autocast(grad_out.device.type, enabled=False):  # the dtypes below are chosen, not cast
            return _BF16SpanAttention._gradients(ctx, grad_out)

    @staticmethod
    def _gradients(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q16, k16, v16, out = ctx.saved_tensors
        heads, width, dim = q16.shape
        kv_heads = k16.shape[0]
        group = heads // kv_heads
        grad_q, grad_k, grad_v = torch.empty_like(q16), torch.empty_like(k16), torch.empty_like(v16)
        grad16 = grad_out[0].to(torch.bfloat16)  # (W, H, D)
        # softmax backward: dS = P * (dP - rowsum(dO * O)), the row sums for all spans at once
        row_dot = (grad16.float() * out.float()).sum(-1)  # (W, H)
        v32 = v16.float()
        start = 0
        with _fp32_matmuls_on_bf16_units():  # dP = dO @ V^T: exact products of bf16 values, fp32 sums
            for length, p16 in zip(ctx.lengths, ctx.probabilities, strict=True):
                span = slice(start, start + length)
                grad_o16 = grad16[span].transpose(0, 1).reshape(kv_heads, group * length, dim)
                grad_v[:, span] = torch.bmm(p16.transpose(1, 2), grad_o16)
                grad_scores = torch.bmm(grad_o16.float(), v32[:, span].transpose(1, 2))
                span_row_dot = row_dot[span].T.reshape(kv_heads, group * length, 1)
                grad_scores = grad_scores.sub_(span_row_dot).mul_(p16).mul_(ctx.scale).to(torch.bfloat16)
                grad_q[:, span] = torch.bmm(grad_scores, k16[:, span]).view(heads, length, dim)
                q_by_kv_head = q16[:, span].reshape(kv_heads, group * length, dim)
                grad_k[:, span] = torch.bmm(grad_scores.transpose(1, 2), q_by_kv_head)
                start += length
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return (grad_q.unsqueeze(0).to(q_dtype), grad_k.unsqueeze(0).to(k_dtype), grad_v.unsqueeze(0).to(v_dtype),
                None, None, None)


def _bf16_span_attention_applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 kwargs: dict[str, Any]) -> bool:
    """bf16 autocast on CPU, plain causal attention (no dropout, bias or softcap), grouped heads."""
    return (query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not kwargs.get("dropout") and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
            and query.shape[1] % key.shape[1] == 0 and query.shape[-1] == key.shape[-1] == value.shape[-1])


VARLEN_KERNEL = "torch varlen flash attention for packed rows"  # once it fails: per-span SDPA from then on


@functools.cache
def torch_varlen_attention() -> Callable[..., torch.Tensor] | None:
    """torch's own variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9:
    CUDA, fp16/bf16, with a backward), if this torch has it with the keywords used below; else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    keywords = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size"} <= keywords.keys():  # torch 2.10 had is_causal instead
        return None
    return cast(Callable[..., torch.Tensor], varlen_attn)  # a tensor: no auxiliary outputs are asked for


@functools.cache
def _takes_grouped_heads(varlen: Callable[..., torch.Tensor]) -> bool:
    return "enable_gqa" in inspect.signature(varlen).parameters


def torch_varlen_applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """A packed row on CUDA in half precision, plain causal attention: one varlen flash-attention call serves
    every span, where SDPA would need one call per sample (tiny kernels and a host sync per layer)."""
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == query.dtype and torch_varlen_attention() is not None
            and not kwargs.get("dropout") and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
            and query.shape[1] % key.shape[1] == 0 and query.shape[-1] == key.shape[-1]
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256)  # flash attention's head sizes


def attend_with_varlen(varlen: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, bounds: torch.Tensor, longest: int, scale: float,
                       window: int | None) -> torch.Tensor:
    """Causal attention within each span of one packed row through a varlen kernel with flash attention's
    layout: query (1, H, W, D), key/value (1, Hkv, W, D) -> (1, W, H, D)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (W, heads, D)
    group = query.shape[1] // key.shape[1]
    grouped = {}
    if group > 1 and _takes_grouped_heads(varlen):
        grouped = {"enable_gqa": True}
    elif group > 1:  # an older varlen_attn: one key/value head per query head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bounds = bounds.to(device=query.device, dtype=torch.int32)
    # (left, right) keys visible around a query: transformers' window of w keeps the w - 1 before it
    window_size = (window - 1, 0) if window is not None else (-1, 0)
    attended = varlen(q, k, v, bounds, bounds, longest, longest, scale=scale, window_size=window_size, **grouped)
    return attended.unsqueeze(0)


def varlen_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per sample of a packed row (batch of one, no cache); plain SDPA for anything else.

    query (1, H, W, D), key/value (1, Hkv, W, D); returns (1, W, H, D) like transformers' SDPA.
    On CUDA in half precision the whole row is one call of torch's varlen flash attention instead.
    """
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    longest = kwargs.pop("max_length_q", None)
    for name in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(name, None)
    if longest is not None and not fell_back(VARLEN_KERNEL) and torch_varlen_applies(module, query, key, kwargs):
        window = kwargs.get("sliding_window")
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        varlen = torch_varlen_attention()
        assert varlen is not None  # checked by torch_varlen_applies
        try:
            return attend_with_varlen(varlen, query, key, value, bounds, int(longest), scale,
                                      window if window is not None and longest > window else None), None
        except (RuntimeError, NotImplementedError) as error:  # e.g. a GPU its flash kernels were not built for
            fall_back(VARLEN_KERNEL, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    edges = bounds.tolist()
    lengths = [end - start for start, end in zip(edges[:-1], edges[1:], strict=True)]
    window = sliding_window(kwargs, lengths)
    if _bf16_span_attention_applies(module, query, key, value, kwargs):
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        with torch.autocast("cpu", enabled=False):  # the matmuls above choose their own dtypes
            attended = _BF16SpanAttention.apply(query, key, value, lengths, scale, window)  # type: ignore[no-untyped-call]
        return attended.to(query.dtype), None
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
    # No mask: SDPA applies the causal pattern within each span itself (is_causal). A span longer
    # than a sliding window gets the window's mask instead.
    def span_mask(length: int) -> torch.Tensor | None:
        return _visible_keys(length, window, query.device)[None, None] if window and length > window else None

    with torch.autocast("cpu", enabled=False) if fp32_on_cpu else nullcontext():
        pieces = [sdpa_attention_forward(module, q, k, v, span_mask(q.shape[2]), **kwargs)[0] for q, k, v in spans]
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
# Padded batches under this implementation still get SDPA's usual mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)


def varlen_kwargs(cu_seq_lens: torch.Tensor) -> dict[str, Any]:
    """The transformers keywords that mark a packed row's sample boundaries (flash-attention's names)."""
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def attention_implementation(model: nn.Module) -> str | None:
    return getattr(getattr(base_model(model), "config", None), "_attn_implementation", None)


def packed_row_capacity(model: nn.Module) -> int | None:
    """Tokens per packed row: no limit (one row per micro-batch) with varlen attention, else 512."""
    return None if attention_implementation(model) in VARLEN_CAPABLE else MASKED_ROW_TOKENS


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
