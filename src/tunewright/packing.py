"""Micro-batches without padding waste: packed rows, or length-grouped padded batches.

Packing concatenates the samples of one micro-batch into one row, each sample with position ids
that restart at 0, and passes the sample boundaries as `cu_seq_lens` (flash-attention's varlen
keywords). No attention mask is passed. Flash-attention 2 on CUDA and our SDPA variant
(kernels/attention.py, used for training on SDPA models) attend within each sample from those
boundaries; any other attention gets transformers' block-diagonal causal mask, which
`masking_utils.find_packed_sequence_indices` builds from the restarting position ids, in rows
capped at `attention.MASKED_ROW_TOKENS` since it computes a whole row's scores. Either
way no sample ever sees another one. The micro-batch holds the same samples as without packing,
so the loss and the gradients of every optimizer step are the same up to float rounding
(tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tunewright.adapters import uses_virtual_tokens
from tunewright.data import IGNORE_INDEX, Example, collate_training
from tunewright.objective import LanguageModelObjective

# Length grouping sorts this many batches' worth of shuffled samples at a time: enough to group
# similar lengths, few enough that every epoch still mixes the data (as in transformers'
# LengthGroupedSampler, which uses 50 batches).
GROUP_SPAN_BATCHES = 50


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices into rows of at most `capacity` tokens.

    A sample longer than `capacity` gets a row of its own.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        for row, room in enumerate(free):
            if lengths[index] <= room:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


def collate_packed(examples: Sequence[Example], pad_id: int,
                   capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Pack a micro-batch into rows of at most `capacity` tokens (default: one row, no padding).

    Returns input_ids, labels and position_ids, each (R, W) with R rows of width W, and for a
    single row `cu_seq_lens` (S+1,): the cumulative sample lengths, starting at 0. A
    `capacity` only pays off for attention that computes a whole row's (W, W) scores. The first
    token of every sample gets the label −100, as in an unpacked row where nothing predicts it;
    without that, the previous sample's last token would be trained to predict it. The tail of a
    short row is padding with its own restarting positions: a separate "sample" with no labels.
    """
    lengths = [len(example.input_ids) for example in examples]
    rows = pack_rows(lengths, capacity or sum(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, W)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, W)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, W)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            example, end = examples[index], start + lengths[index]
            input_ids[row, start:end] = torch.tensor(example.input_ids)
            labels[row, start:end] = torch.tensor(example.labels)
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(lengths[index])
            start = end
        position_ids[row, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if len(rows) == 1:
        spans = torch.tensor([0] + [lengths[i] for i in rows[0]])
        batch["cu_seq_lens"] = spans.cumsum(0).to(torch.int32)
    return batch


def collate_micro_batch(examples: Sequence[Example], pad_id: int, packing: bool,
                        row_capacity: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one training micro-batch: packed rows, or right-padded rows with a mask.

    Packed rows hold at most `row_capacity` tokens (None: the whole micro-batch in one row).
    Category examples (with a label index) are never packed: their classifier reads one row per sample.
    """
    if packing and examples[0].label_index is None:
        return collate_packed(examples, pad_id, row_capacity)
    return collate_training(examples, pad_id)


def supports_packing(objective: nn.Module) -> bool:
    """Packing needs a model that takes position ids and builds its own mask from them.

    Only the language-model objective packs (a classifier reads one row per sample), and not
    with peft prompt learning, which prepends virtual tokens per row inside its own forward.
    """
    return isinstance(objective, LanguageModelObjective) and not uses_virtual_tokens(objective.model)


def group_by_length(batches: Sequence[Sequence[int]], lengths: Sequence[int], seed: int,
                    epoch: int) -> list[list[int]]:
    """Regroup shuffled batches so each holds samples of similar length (less padding).

    Each span of `GROUP_SPAN_BATCHES` batches is sorted by length and cut again into batches of
    the same sizes; the batches are then shuffled, so long and short ones alternate. A pure
    function of (seed, epoch), like the shuffle itself, so a resumed run replays it exactly.
    """
    order = [index for batch in batches for index in batch]
    sizes = [len(batch) for batch in batches]
    span = GROUP_SPAN_BATCHES * max(sizes, default=1)
    ordered: list[int] = []
    for start in range(0, len(order), span):
        ordered.extend(sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True))
    regrouped, start = [], 0
    for size in sizes:
        regrouped.append(ordered[start : start + size])
        start += size
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    return [regrouped[i] for i in torch.randperm(len(regrouped), generator=generator).tolist()]
