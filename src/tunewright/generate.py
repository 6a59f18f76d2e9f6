"""Batched, left-padded generation with the prompt sliced off at the known input length.

Greedy decoding (the default) runs our own loop: one prefill with the LM head on the last
position only (the prompts packed into one row without their padding, where attention runs per
prompt), then one token per step from a KV cache, and rows that have stopped leave the
batch, so the cost of a batch follows its live rows instead of its longest answer. It calls
the same forward as transformers' `generate` with the same inputs (positions from the padding
mask), so its tokens equal `generate`'s (tests/test_generate.py). Sampling, beams and a
repetition penalty go through `generate` itself.

On CPU both run the linear layers on weights packed once for oneDNN (kernels/prepacked.py): the same
fp32 arithmetic in another summation order (bf16: the same bits), so a greedy token could only
change where two logits tie to within fp32 rounding; the tests and bench/generate_speed.py
compare every token with `generate` on F.linear.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicLayer

from tunewright.adapters import uses_virtual_tokens
from tunewright.chat_templates import end_of_turn_id
from tunewright.config import GenerationSettings
from tunewright.data import collate_prompts
from tunewright.kernels.attention import packed_attention, packed_row_capacity, varlen_kwargs
from tunewright.kernels.prepacked import inference_kernels
from tunewright.progress import log_phase, work_progress


def to_generation_config(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase,
                         max_new_tokens: int | None = None) -> GenerationConfig:
    """The single mapping from our generation section onto transformers' GenerationConfig."""
    values = {
        "max_new_tokens": max_new_tokens or settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "num_beams": settings.num_beams,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
    }
    if not settings.do_sample:  # unset sampling knobs so transformers does not warn about them
        values.update(temperature=None, top_k=None, top_p=None)
    if settings.cache == "static":
        values["cache_implementation"] = "static"
    return GenerationConfig(
        **{key: value for key, value in values.items() if value is not None},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids if len(end_ids := end_token_ids(tokenizer)) > 1 else tokenizer.eos_token_id,
    )


def end_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS, then the chat template's end-of-turn token when it is another one (ChatML's <|im_end|>)."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(token for token in ids if token is not None))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a generated row: EOS, the chat template's end of turn, and padding."""
    return {*end_token_ids(tokenizer), tokenizer.pad_token_id} - {None}


def trim_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """New tokens up to (not including) the first EOS/pad."""
    out = []
    for token in ids:
        if token in stop_ids:
            break
        out.append(token)
    return out


def uses_greedy_loop(model: nn.Module, settings: GenerationSettings) -> bool:
    """Our loop covers plain greedy decoding on a dynamic cache; everything else is transformers' `generate`."""
    plain = settings.repetition_penalty is None or settings.repetition_penalty == 1.0
    return (not settings.do_sample and settings.num_beams == 1 and plain and settings.cache == "dynamic"
            and not uses_virtual_tokens(model))


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts, as transformers' generate builds them (padding at 0)."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return positions.masked_fill(attention_mask == 0, 0)


def packed_prefill_applies(model: nn.Module, attention_mask: torch.Tensor) -> bool:
    """Prefill without padding when the batch has padding, attention runs per sample (SDPA or
    flash-attention varlen) and every layer's cache keeps all keys (no sliding window)."""
    config = getattr(model, "config", None)
    if attention_mask.shape[0] < 2 or bool(attention_mask.all()) or config is None \
            or packed_row_capacity(model) is not None:
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def packed_prefill(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """The prefill of left-padded prompts as one packed row: the same logits and cache, no padding work.

    The prompts' real tokens run as one row with positions restarting per prompt and attention per
    prompt (kernels/attention.py), so a batch pays for its real tokens only (padding was a fifth of the
    benchmark's prompt tokens). Each layer's keys and values are then laid out left-padded, as a
    padded prefill leaves them (zeros where the mask hides them), for the decode steps.
    Returns the last-position logits of each row (B, V) and the cache.
    """
    real = attention_mask.bool()  # (B, T)
    lengths = real.sum(dim=1)  # (B,)
    ends = lengths.cumsum(dim=0)  # (B,)
    bounds = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)  # (B + 1,)
    config: Any = model.config  # a PretrainedConfig; nn.Module's attribute typing does not say so
    cache = DynamicCache(config=config)
    with packed_attention(model):
        output = model(input_ids=input_ids[real][None], position_ids=prompt_positions(attention_mask)[real][None],
                       cache=cache, use_cache=True, logits_to_keep=ends - 1, **varlen_kwargs(bounds))
    for layer in cache.layers:  # (1, H, N, D) packed -> (B, H, T, D) left-padded
        for name in ("keys", "values"):
            packed = getattr(layer, name)[0].transpose(0, 1)  # (N, H, D)
            padded = packed.new_zeros(*real.shape, *packed.shape[1:])  # (B, T, H, D)
            padded[real] = packed
            setattr(layer, name, padded.transpose(1, 2).contiguous())
    return output.logits[0], cache


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, stop_ids: set[int],
                  on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Greedy new tokens of each left-padded row, up to and including its first stop token.

    `on_token(row, token)`, if given, sees each new token of each running row as it is chosen
    and returns True when that row is finished (the server's stop strings, per-row limits,
    streaming and cancelled clients); a finished row leaves like a stopped one.

    Each step feeds only the newest token against the KV cache and computes logits for it alone.
    Rows that emitted a stop token ride along until at most half the batch is still live; then
    the batch (and its cache) is cut down to the live rows. Cutting at every finished row costs
    more than it saves: a CPU decode step is bound by reading the weights, and matmuls of some
    odd batch sizes run slower than 16 rows (bench/generate_speed.py, BENCHMARKS.md).
    """
    results: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (b,): original row of each batch row
    live = torch.ones_like(rows, dtype=torch.bool)  # (b,): not stopped yet
    positions = prompt_positions(attention_mask)
    if packed_prefill_applies(model, attention_mask):
        logits, cache = packed_prefill(model, input_ids, attention_mask)
    else:
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1)
        logits, cache = output.logits[:, -1], output.cache
    next_positions = positions[:, -1:] + 1  # (b, 1)
    stop = torch.tensor(sorted(stop_ids), device=input_ids.device)
    for step in range(max_new_tokens):
        tokens = logits.argmax(dim=-1)  # (b,)
        finished = []  # rows that on_token ends
        for row, token, running in zip(rows.tolist(), tokens.tolist(), live.tolist(), strict=True):
            if running:
                results[row].append(token)
            finished.append(running and on_token is not None and on_token(row, token))
        stopped = torch.isin(tokens, stop)
        if any(finished):
            stopped |= torch.tensor(finished, device=stopped.device)
        live = live & ~stopped
        live_count = int(live.sum())
        if step == max_new_tokens - 1 or live_count == 0:
            break
        if live_count <= len(rows) // 2:
            cache.batch_select_indices(live.nonzero().squeeze(1))
            rows, tokens, next_positions = rows[live], tokens[live], next_positions[live]
            attention_mask = attention_mask[live]
            live = live[live]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)  # (b, T+1)
        output = model(input_ids=tokens.unsqueeze(1), attention_mask=attention_mask,
                       position_ids=next_positions, cache=cache, use_cache=True)
        logits = output.logits[:, -1]
        next_positions = next_positions + 1
    return results


@contextmanager
def quiet_prompt_learning() -> Iterator[None]:
    """peft warns on every prompt-tuning generate() that it drops the position ids transformers passes;
    nothing a user can act on (RoPE keeps the prompt's relative positions). Silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
        yield


def generate_batch(model: nn.Module, batch: dict[str, torch.Tensor], settings: GenerationSettings,
                   config: GenerationConfig, stop_ids: set[int], on_token: Callable[[int, int], bool] | None = None,
                   stopping_criteria: StoppingCriteriaList | None = None) -> list[list[int]] | None:
    """New tokens of one left-padded batch: the one place that picks tunewright's greedy loop or `generate`.

    Plain greedy decoding runs `greedy_decode` (packed prefill, finished rows leave the batch;
    `on_token` sees every token); anything else runs transformers' `generate` with
    `stopping_criteria`. Returns each row's new tokens (not trimmed at stop tokens).
    """
    with torch.inference_mode(), inference_kernels(model):
        if uses_greedy_loop(model, settings):
            return greedy_decode(model, batch["input_ids"], batch["attention_mask"], config.max_new_tokens,
                                 stop_ids, on_token=on_token)
        with quiet_prompt_learning():
            output = model.generate(**batch, generation_config=config, stopping_criteria=stopping_criteria)
        return cast(list[list[int]], output[:, batch["input_ids"].shape[1] :].tolist())


def generation_batches(lengths: Sequence[int], settings: GenerationSettings) -> list[list[int]]:
    """Positions into `lengths` (prompt lengths, longest first) for each batch: at most `batch_size` prompts
    and, with `batch_tokens`, at most that many KV-cache slots, rows x (longest prompt + max_new_tokens).
    The longest prompt of a batch is its first, so its slots are known as each row joins."""
    batches: list[list[int]] = []
    for position in range(len(lengths)):
        batch = batches[-1] if batches else None
        if batch is not None and len(batch) < settings.batch_size and (
                settings.batch_tokens is None
                or (len(batch) + 1) * (lengths[batch[0]] + settings.max_new_tokens) <= settings.batch_tokens):
            batch.append(position)
        else:
            batches.append([position])
    return batches


def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    settings: GenerationSettings,
    show_progress: bool = False,
) -> list[list[int]]:
    """Generate for every prompt, in batches sorted by length to cut padding; results keep input order."""
    config = to_generation_config(settings, tokenizer)
    stop_ids = stop_token_ids(tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda row: len(prompt_ids[row]), reverse=True)
    results: list[list[int]] = [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    started = time.perf_counter()
    # On CPU the linear layers run on weights packed once (kernels/prepacked.py): decode steps are small
    # matmuls; entered here too so that every batch reuses the packed weights.
    batches = generation_batches([len(prompt_ids[row]) for row in order], settings)
    with inference_kernels(model), work_progress(len(prompt_ids), "generating", show_progress) as progress:
        for positions in batches:
            rows = [order[position] for position in positions]
            batch = collate_prompts([prompt_ids[r] for r in rows], tokenizer.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            new_tokens = generate_batch(model, batch, settings, config, stop_ids)
            for row, tokens in zip(rows, new_tokens or [], strict=True):
                results[row] = trim_at_stop(tokens, stop_ids)
            progress.update(advance=len(rows))
    new_tokens = sum(len(tokens) for tokens in results)
    log_phase(f"generated {len(results):,} completions ({new_tokens:,} new tokens)", started)
    return results


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    settings: GenerationSettings,
    show_progress: bool = False,
) -> list[str]:
    ids = generate_ids(model, tokenizer, prompt_ids, settings, show_progress)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
