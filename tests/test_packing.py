"""Packing and length grouping: packed rows train exactly like padded rows (up to float rounding).

Tolerance: fp32 throughout; per-sample losses agree to 1e-5 (absolute) and gradients to a
relative 1e-4 of their norm. The differences come only from summation order in matmuls of
other shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from tunewright.adapters import attach_adapter
from tunewright.config import AdapterConfig, TrainerConfig
from tunewright.data import IGNORE_INDEX, Example, collate_training
from tunewright.objective import LanguageModelObjective, hidden_states
from tunewright.packing import collate_micro_batch, collate_packed, group_by_length, pack_rows, supports_packing
from tunewright.train import epoch_batches, fit

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4


def make_example(prompt: list[int], target: list[int]) -> Example:
    labels = [IGNORE_INDEX] * len(prompt) + target
    return Example(input_ids=prompt + target, labels=labels, prompt_len=len(prompt))


def random_examples() -> list[Example]:
    """Six samples of different prompt and target lengths, fixed by a seed."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (9, 3), (3, 6), (12, 2), (4, 4), (7, 5)]
    return [
        make_example(torch.randint(3, 250, (p,), generator=generator).tolist(),
                     torch.randint(3, 250, (t,), generator=generator).tolist())
        for p, t in shapes
    ]


@pytest.fixture
def examples() -> list[Example]:
    return random_examples()


def test_pack_rows_first_fit_decreasing() -> None:
    assert pack_rows([5, 9, 3, 12, 4], capacity=12) == [[3], [1, 2], [0, 4]]
    assert pack_rows([20, 3], capacity=12) == [[0], [1]]  # an overlong sample gets its own row


def test_collate_packed_tensors() -> None:
    first = make_example([7, 8], [9, 2])  # 4 tokens
    second = make_example([5], [6, 2])  # 3 tokens
    batch = collate_packed([first, second], pad_id=0, capacity=8)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 2, 5, 6, 2]]
    # The first token of each sample is never a target: nothing in its own sample predicts it.
    assert batch["labels"].tolist() == [[-100, -100, 9, 2, -100, 6, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert "attention_mask" not in batch


def test_collate_packed_pads_short_rows_as_their_own_segment() -> None:
    batch = collate_packed([make_example([1, 2], [3, 4, 5]), make_example([6], [7])], pad_id=0, capacity=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 7, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position next-token losses (R, W-1); 0 where the label is −100."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # use_cache=False as in objective.py: transformers reads packed position ids only without a cache.
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


def sample_losses_packed(model: torch.nn.Module, examples: list[Example]) -> list[float]:
    """Each sample's summed loss, read back from its span in the packed rows."""
    lengths = [len(example.input_ids) for example in examples]
    batch = collate_packed(examples, pad_id=0, capacity=30)
    assert batch["input_ids"].shape[0] < len(examples)  # samples really share rows
    losses = token_losses(model, batch)
    result = {}
    for row, members in enumerate(pack_rows(lengths, 30)):
        start = 0
        for index in members:
            # position p predicts token p+1, so the sample's span is [start, start+len-1).
            result[index] = losses[row, start : start + lengths[index] - 1].sum().item()
            start += lengths[index]
    return [result[i] for i in range(len(examples))]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(tiny_model, examples, attention: str) -> None:
    tiny_model.config._attn_implementation = attention
    padded = token_losses(tiny_model, collate_training(examples, pad_id=0)).sum(dim=1).tolist()
    packed = sample_losses_packed(tiny_model, examples)
    assert packed == pytest.approx(padded, abs=LOSS_ATOL)


def test_no_attention_across_samples(tiny_model, examples) -> None:
    """Changing one sample's tokens leaves every other sample's logits unchanged."""
    batch = collate_packed(examples[:2], pad_id=0, capacity=100)
    changed = {k: v.clone() for k, v in batch.items()}
    first_len = len(examples[0].input_ids)  # FFD puts the longer (second) sample first
    second_len = len(examples[1].input_ids)
    assert first_len < second_len
    changed["input_ids"][0, :second_len] = 5
    with torch.no_grad():  # through the objective's path: the decoder without cache or mask
        before = hidden_states(tiny_model, batch["input_ids"], None, batch["position_ids"])
        after = hidden_states(tiny_model, changed["input_ids"], None, changed["position_ids"])
    assert torch.allclose(before[0, second_len:], after[0, second_len:], atol=1e-6)
    assert not torch.allclose(before[0, :second_len], after[0, :second_len])


def lora_objective(model: torch.nn.Module) -> LanguageModelObjective:
    torch.manual_seed(1)
    wrapped = attach_adapter(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    for name, parameter in wrapped.named_parameters():  # lora_B starts at 0: move it so gradients differ
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return LanguageModelObjective(wrapped)


def gradients(objective: LanguageModelObjective, batch: dict[str, torch.Tensor]) -> tuple[float, dict]:
    objective.zero_grad()
    out = objective(**batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.requires_grad}
    return out.loss_sum.item(), grads


def test_packed_gradients_equal_unpacked(tiny_model, examples) -> None:
    objective = lora_objective(tiny_model)
    assert supports_packing(objective)
    packed_batch = collate_micro_batch(examples, pad_id=0, packing=True)
    padded_batch = collate_micro_batch(examples, pad_id=0, packing=False)
    assert packed_batch["input_ids"].numel() < padded_batch["input_ids"].numel()
    packed_loss, packed_grads = gradients(objective, packed_batch)
    padded_loss, padded_grads = gradients(objective, padded_batch)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for name, grad in padded_grads.items():
        assert torch.linalg.norm(packed_grads[name] - grad) <= GRAD_RTOL * torch.linalg.norm(grad), name


def test_fit_packed_and_unpacked_give_the_same_loss_curve(tokenizer, examples) -> None:
    from conftest import build_model  # the same seeded weights for both runs

    histories = []
    for packing in (True, False):
        objective = lora_objective(build_model(len(tokenizer)))
        cfg = TrainerConfig(max_steps=4, batch_size=3, learning_rate=0.01, packing=packing, seed=3)
        result = fit(objective, examples, [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
        histories.append([record["loss"] for record in result.history])
    assert histories[0] == pytest.approx(histories[1], abs=1e-4)


def test_group_by_length_is_a_deterministic_regrouping() -> None:
    lengths = [((i * 37) % 23) + 1 for i in range(40)]
    batches = epoch_batches(40, 4, seed=1, epoch=0)
    grouped = group_by_length(batches, lengths, seed=1, epoch=0)
    assert sorted(i for batch in grouped for i in batch) == list(range(40))
    assert sorted(map(len, grouped)) == sorted(map(len, batches))
    assert grouped == group_by_length(batches, lengths, seed=1, epoch=0)

    def padding(batch_list: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batch_list)

    assert padding(grouped) < padding(batches)
