"""Our greedy loop gives transformers' greedy `generate` tokens, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, GenerationSettings
from tunewright.data import collate_prompts
from tunewright.generate import (
    generate_ids,
    generation_batches,
    greedy_decode,
    packed_prefill,
    packed_prefill_applies,
    prompt_positions,
    trim_at_stop,
    uses_greedy_loop,
)

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
    def record_decode_step(_, args, kwargs) -> None:  # one new token per row (the prefill is one packed row)
        if kwargs["input_ids"].shape[1] == 1:
            batch_sizes.append(kwargs["input_ids"].shape[0])

    hook = tiny_model.register_forward_pre_hook(record_decode_step, with_kwargs=True)
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


def test_static_cache_goes_through_generate_with_the_same_greedy_tokens(tiny_model, tokenizer, prompt_ids) -> None:
    """generation.cache: static (transformers' fixed-shape cache, compiled on CUDA) decodes the same tokens."""
    static = GenerationSettings(max_new_tokens=8, batch_size=4, cache="static")
    assert not uses_greedy_loop(tiny_model, static)
    ours = generate_ids(tiny_model, tokenizer, prompt_ids, static)
    assert ours == generate_ids(tiny_model, tokenizer, prompt_ids, GenerationSettings(max_new_tokens=8, batch_size=4))


def test_sampling_still_goes_through_generate(tiny_model, tokenizer, prompt_ids) -> None:
    torch.manual_seed(0)
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=0.8, top_k=20)
    outputs = generate_ids(tiny_model, tokenizer, prompt_ids, settings)
    assert len(outputs) == len(prompt_ids) and all(len(tokens) <= 4 for tokens in outputs)


def test_packed_prefill_gives_the_padded_prefills_logits_and_cache(tiny_model, tokenizer, prompt_ids) -> None:
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert packed_prefill_applies(tiny_model, mask)
    with torch.inference_mode():
        padded = tiny_model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask), use_cache=True,
                            logits_to_keep=1)
        logits, cache = packed_prefill(tiny_model, ids, mask)
    torch.testing.assert_close(logits, padded.logits[:, -1], rtol=1e-5, atol=1e-5)
    real = mask.bool()[:, None, :, None]  # (B, 1, T, 1): padding slots hold zeros, the rest the same keys
    for ours, theirs in zip(cache.layers, padded.cache.layers, strict=True):
        for name in ("keys", "values"):
            assert getattr(ours, name).shape == getattr(theirs, name).shape
            torch.testing.assert_close(getattr(ours, name) * real, getattr(theirs, name) * real, rtol=1e-5, atol=1e-5)
            assert not getattr(ours, name).masked_select(~real).any()


def test_packed_prefill_only_where_it_pays_and_attends_per_prompt(tiny_model, tokenizer, prompt_ids) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    mask = collate_prompts(prompt_ids, tokenizer.pad_token_id)["attention_mask"]
    assert not packed_prefill_applies(tiny_model, torch.ones_like(mask))  # no padding to save
    assert not packed_prefill_applies(tiny_model, mask[:1])  # one row
    windowed = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=4, pad_token_id=0))
    assert not packed_prefill_applies(windowed, mask)  # its cache keeps a window only
    tiny_model.set_attn_implementation("eager")  # would attend across prompts in one row
    assert not packed_prefill_applies(tiny_model, mask)


def test_greedy_tokens_with_packed_prefill_equal_generate_over_long_and_short_prompts(tiny_model, tokenizer) -> None:
    prompt_ids = [list(range(3, 3 + length)) for length in (31, 2, 17, 1, 9)]  # mostly padding in short rows
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    assert packed_prefill_applies(tiny_model, batch["attention_mask"])
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ours = greedy_decode(tiny_model, batch["input_ids"], batch["attention_mask"], 8, stop_ids)
    assert [trim_at_stop(row, stop_ids) for row in ours] == reference_tokens(tiny_model, tokenizer, prompt_ids, 8,
                                                                            stop_ids)


def test_batches_keep_within_the_token_budget() -> None:
    """rows x (longest prompt + max_new_tokens) <= batch_tokens, at most batch_size rows, order kept;
    a prompt over the budget goes alone."""
    lengths = [90, 40, 30, 30, 20, 10, 10, 5, 5, 5]  # longest first, as generate_ids sorts them
    settings = GenerationSettings(max_new_tokens=10, batch_size=4, batch_tokens=120)
    batches = generation_batches(lengths, settings)
    assert batches == [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]
    for batch in batches[1:]:
        assert len(batch) * (lengths[batch[0]] + 10) <= 120
    assert generation_batches(lengths, GenerationSettings(max_new_tokens=10, batch_size=4)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_token_budget_changes_the_batches_not_the_tokens(tiny_model, tokenizer, prompt_ids) -> None:
    budgeted = GenerationSettings(max_new_tokens=8, batch_size=16, batch_tokens=3 * (max(map(len, prompt_ids)) + 8))
    widths: list[int] = []
    hook = tiny_model.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    ours = generate_ids(tiny_model, tokenizer, prompt_ids, budgeted)
    hook.remove()
    assert max(widths) <= 3 < len(prompt_ids)
    assert ours == generate_ids(tiny_model, tokenizer, prompt_ids, GenerationSettings(max_new_tokens=8, batch_size=16))
