"""Batched, left-padded generation with the prompt sliced off at the known input length."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tunewright.config import GenerationSettings
from tunewright.data import collate_prompts
from tunewright.progress import work_progress


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
    return GenerationConfig(
        **{key: value for key, value in values.items() if value is not None},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def trim_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """New tokens up to (not including) the first EOS/pad."""
    out = []
    for token in ids:
        if token in stop_ids:
            break
        out.append(token)
    return out


@torch.inference_mode()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    settings: GenerationSettings,
    show_progress: bool = False,
) -> list[list[int]]:
    """Generate for every prompt, in batches sorted by length to cut padding; results keep input order."""
    config = to_generation_config(settings, tokenizer)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    order = sorted(range(len(prompt_ids)), key=lambda row: len(prompt_ids[row]), reverse=True)
    results: list[list[int]] = [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    with work_progress(len(prompt_ids), "generating", show_progress) as progress:
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            batch = {k: v.to(device) for k, v in collate_prompts([prompt_ids[r] for r in rows], tokenizer.pad_token_id).items()}
            output = model.generate(**batch, generation_config=config)  # (B, T + new)
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for row, tokens in zip(rows, new_tokens, strict=True):
                results[row] = trim_at_stop(tokens, stop_ids)
            progress.update(advance=len(rows))
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
