"""Our greedy loop gives transformers' greedy `generate` tokens, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, GenerationSettings
from tunewright.data import collate_prompts
from tunewright.generate import generate_ids, greedy_decode, prompt_positions, trim_at_stop, uses_greedy_loop

PROMPTS = ["hi", "a much longer prompt about cats", "dogs?", "x", "the sea is red and the owl", "ink fig"]


def reference_tokens(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                     stop_ids: set[int]) -> list[list[int]]:
    """transformers' greedy generate on one left-padded batch, trimmed at the first stop token."""
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids))
    with torch.inference_mode():
        output = model.generate(**batch, generation_config=config)
    return [trim_at_stop(row, stop_ids) for row in output[:, batch["input_ids"].shape[1] :].tolist()]


@pytest.fixture
def prompt_ids(tokenizer) -> list[list[int]]:
    return tokenizer(PROMPTS)["input_ids"]


def test_prompt_positions_skip_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompt_positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


@pytest.mark.parametrize("batch_size", [16, 4])
def test_greedy_equals_transformers_generate(tiny_model, tokenizer, prompt_ids, batch_size: int) -> None:
    settings = GenerationSettings(max_new_tokens=12, batch_size=batch_size)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ours = generate_ids(tiny_model, tokenizer, prompt_ids, settings)
    expected = reference_tokens(tiny_model, tokenizer, prompt_ids, 12, stop_ids)
    assert ours == expected
    assert all(len(tokens) == 12 for tokens in ours)  # random weights rarely emit EOS: full length


def test_rows_that_stop_early_leave_the_batch_unchanged_otherwise(tiny_model, tokenizer, prompt_ids) -> None:
    """Stop on tokens that some rows emit mid-way, so the batch shrinks during decoding."""
    first = reference_tokens(tiny_model, tokenizer, prompt_ids, 12, {tokenizer.eos_token_id})
    stop_ids = {tokenizer.eos_token_id, first[0][2], first[3][5]}
    expected = reference_tokens(tiny_model, tokenizer, prompt_ids, 12, stop_ids)
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    ours = greedy_decode(tiny_model, batch["input_ids"], batch["attention_mask"], 12, stop_ids)
    assert [trim_at_stop(row, stop_ids) for row in ours] == expected
    lengths = [len(row) for row in ours]
    assert min(lengths) < 12 and max(lengths) == 12  # some rows stopped, others ran to the end
    assert all(row[-1] in stop_ids for row in ours if len(row) < 12)


def test_batch_shrinks_once_half_the_rows_have_stopped(tiny_model, tokenizer, prompt_ids) -> None:
    """Stopped rows ride along while most rows run; the batch is cut when at most half are live."""
    first = reference_tokens(tiny_model, tokenizer, prompt_ids, 12, {tokenizer.eos_token_id})
    stop_ids = {tokenizer.eos_token_id} | {first[row][1] for row in range(4)}  # rows 0-3 stop by step 2
    expected = reference_tokens(tiny_model, tokenizer, prompt_ids, 12, stop_ids)
    batch_sizes: list[int] = []
    hook = tiny_model.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    try:
        ours = greedy_decode(tiny_model, batch["input_ids"], batch["attention_mask"], 12, stop_ids)
    finally:
        hook.remove()
    assert [trim_at_stop(row, stop_ids) for row in ours] == expected
    live_at_end = sum(len(row) == 12 and row[-1] not in stop_ids for row in ours)
    assert batch_sizes[0] == len(prompt_ids) and batch_sizes[-1] < len(prompt_ids)
    assert min(batch_sizes) >= live_at_end and all(size > len(prompt_ids) // 2 or size <= 3 for size in batch_sizes)


def test_greedy_equals_transformers_generate_with_lora(tiny_model, tokenizer, prompt_ids) -> None:
    torch.manual_seed(0)
    model = attach_adapter(tiny_model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero; move it so the adapter changes the output
            torch.nn.init.normal_(parameter, std=0.5)
    model.eval()
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ours = generate_ids(model, tokenizer, prompt_ids, GenerationSettings(max_new_tokens=10))
    assert ours == reference_tokens(model, tokenizer, prompt_ids, 10, stop_ids)


def test_results_keep_input_order(tiny_model, tokenizer, prompt_ids) -> None:
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    together = generate_ids(tiny_model, tokenizer, prompt_ids, settings)
    one_by_one = [generate_ids(tiny_model, tokenizer, [ids], settings)[0] for ids in prompt_ids]
    assert together == one_by_one


def test_only_plain_greedy_uses_our_loop(tiny_model) -> None:
    assert uses_greedy_loop(tiny_model, GenerationSettings())
    assert not uses_greedy_loop(tiny_model, GenerationSettings(do_sample=True, temperature=0.7))
    assert not uses_greedy_loop(tiny_model, GenerationSettings(num_beams=2))
    assert not uses_greedy_loop(tiny_model, GenerationSettings(repetition_penalty=1.3))


def test_sampling_still_goes_through_generate(tiny_model, tokenizer, prompt_ids) -> None:
    torch.manual_seed(0)
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=0.8, top_k=20)
    outputs = generate_ids(tiny_model, tokenizer, prompt_ids, settings)
    assert len(outputs) == len(prompt_ids) and all(len(tokens) <= 4 for tokens in outputs)
