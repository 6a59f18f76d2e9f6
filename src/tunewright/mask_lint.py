"""`tunewright inspect`: which tokens train, before anything trains.

It renders a few rows exactly as training tokenises them, with the trained tokens highlighted, and counts
over the whole dataset what the loss masks and the length limit do: rows left with no trained token, rows
whose target was cut away, turns cut, and whether the end-of-sequence token trains (a model that never
trains it never learns to stop). Only the tokenizer and the model's config load, never the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from transformers import AutoConfig, PreTrainedTokenizerBase

from tunewright.chat_data import MaskedRow, MaskStats, frame_conversations, masked_rows
from tunewright.chat_templates import set_run_template
from tunewright.config import TunewrightConfig, load_config
from tunewright.data import (
    IGNORE_INDEX,
    Dataset,
    as_frame,
    build_examples,
    check_columns,
    drop_missing_targets,
    encode_prompts,
    few_shot_pool,
    render_prompts,
)
from tunewright.generate import end_token_ids
from tunewright.model import CONTEXT_SAFETY_MARGIN, FALLBACK_CONTEXT_LEN, load_tokenizer, resolve_model_source

TRAINED_STYLE = "bold black on green"
CONTEXT_KEYS = ("max_sequence_length", "max_position_embeddings")


@dataclass
class Inspection:
    """The masked rows of a dataset and their counts."""

    source: str
    rows: list[MaskedRow]
    stats: MaskStats
    tokenizer: PreTrainedTokenizerBase
    max_len: int


def _context_length(source: str) -> int:
    model_config = AutoConfig.from_pretrained(source)
    for key in CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_LEN


def _column_rows(config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase, frame: Any, prompt_limit: int,
                 source: str) -> tuple[list[MaskedRow], MaskStats]:
    """Prompt/target rows as training builds them: the prompt never trains, the target and EOS do."""
    target = config.output_feature.name
    check_columns(frame, [*config.input_columns, target], source)
    frame = drop_missing_targets(frame, target, source)
    # Few-shot rows are shown as training sees them: examples drawn from the inspected rows, never a row itself.
    texts = render_prompts(frame, config, few_shot_pool(frame, config), in_pool=True)
    prompt_ids = encode_prompts(texts, tokenizer, config.prompt.use_chat_template)
    fitted = [ids[-prompt_limit:] for ids in prompt_ids]
    targets = [str(value) for value in frame[target]]
    examples = build_examples(fitted, targets, tokenizer, config.preprocessing.max_target_length)
    stops = set(end_token_ids(tokenizer))
    stats = MaskStats(rows=len(examples))
    rows = []
    for ids, example in zip(prompt_ids, examples, strict=True):
        train = [label != IGNORE_INDEX for label in example.labels]
        rows.append(MaskedRow(example.input_ids, train, True, int(len(ids) > prompt_limit)))
        stats.tokens += len(train)
        stats.trained_tokens += sum(train)
        stats.turns_cut += int(len(ids) > prompt_limit)
        stats.eos_trained |= any(t and i in stops for i, t in zip(example.input_ids, train, strict=True))
    return rows, stats


def inspect_dataset(config: str | Path | TunewrightConfig, dataset: Dataset) -> Inspection:
    """Mask every row of `dataset` as `train` would, loading the tokenizer (not the model)."""
    config = load_config(config)
    frame, source = as_frame(dataset)
    model_source = resolve_model_source(config.base_model)
    tokenizer = load_tokenizer(model_source, config.backend.trust_remote_code)
    set_run_template(config, tokenizer)
    context = _context_length(model_source) - CONTEXT_SAFETY_MARGIN
    cap = config.preprocessing.max_input_length
    if config.conversation is not None:
        max_len = min(context, cap) if cap else context
        conversations = frame_conversations(frame, config.conversation, source)
        rows, stats = masked_rows(tokenizer, conversations, config, max_len)
    else:
        prompt_limit = context - config.generation.max_new_tokens
        max_len = min(prompt_limit, cap) if cap else prompt_limit
        rows, stats = _column_rows(config, tokenizer, frame, max_len, source)
    return Inspection(source, rows, stats, tokenizer, max_len)


def highlighted(row: MaskedRow, tokenizer: PreTrainedTokenizerBase, marks: bool = False) -> Text:
    """The row's text, token by token, with the trained tokens highlighted (and, with `marks`, in ⟦ ⟧ for
    output without colours)."""
    text = Text()
    previous = False
    for token_id, train in [*zip(row.input_ids, row.train, strict=True), (None, False)]:
        if marks and train != previous:
            text.append("⟦" if train else "⟧")
        previous = train
        if token_id is not None:
            text.append(str(tokenizer.decode([token_id])), style=TRAINED_STYLE if train else "dim")
    return text


def counts_table(inspection: Inspection) -> Table:
    stats = inspection.stats
    table = Table(title=f"loss masks of {inspection.source}", show_header=False)
    share = stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    for name, value in (
        ("rows", f"{stats.rows:,}"),
        ("rows with no trained token", f"{stats.no_trained_token:,}"),
        ("rows whose target was truncated away", f"{stats.target_truncated_away:,}"),
        (f"turns cut by the length limit ({inspection.max_len:,} tokens)", f"{stats.turns_cut:,}"),
        ("EOS / end of turn trained", "yes" if stats.eos_trained else "NO: the model will not learn to stop"),
        ("trained tokens", f"{stats.trained_tokens:,} of {stats.tokens:,} ({share:.1%})"),
    ):
        table.add_row(name, value)
    return table


def inspection_view(inspection: Inspection, rows: int = 3, marks: bool = False) -> RenderableType:
    """The first `rows` rows highlighted, then the counts."""
    previews = [
        Panel(highlighted(row, inspection.tokenizer, marks), title=f"row {index + 1}", title_align="left")
        for index, row in enumerate(inspection.rows[:rows])
    ]
    shown = "⟦highlighted⟧" if marks else "highlighted"
    legend = Text.assemble("trained tokens are ", (shown, TRAINED_STYLE), "; the rest is context")
    return Group(legend, *previews, counts_table(inspection))
