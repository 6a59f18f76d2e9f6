"""Preference runs (trainer.type dpo, orpo, simpo, kto) on fit(): data, reference, batching, evaluation.

api.train() calls `preference_splits` while checking the data (before any model loads), then
`prepare_preference_fit` for fit()'s objective, examples and batching, and `evaluate_preference`
for the validation and test metrics; `tunewright evaluate` on a preference run uses the latter too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from torch import nn

from tunewright.checkpoint import frame_hash
from tunewright.config import PREFERENCE_TRAINERS, TunewrightConfig
from tunewright.data import Splits
from tunewright.errors import ConfigError, DataError
from tunewright.model import base_model
from tunewright.preference_data import DataCounts, PreferenceExample, build_preference_examples, preference_frame
from tunewright.preference_objective import (
    STAT_NAMES,
    PreferenceObjective,
    Reference,
    collate_pairs,
    evaluate_pairs,
)
from tunewright.reference_cache import CACHE_DIR, attach_reference_logps, reference_identity
from tunewright.train import Batching

log = logging.getLogger(__name__)


def is_preference(config: TunewrightConfig) -> bool:
    return config.trainer.type in PREFERENCE_TRAINERS


def preference_splits(config: TunewrightConfig, frame: pd.DataFrame, source: str,
                      validation: pd.DataFrame | None, validation_source: str) -> Splits:
    """The splits, each checked and normalised (hh-rlhf transcripts split, empty rows dropped and counted).

    Each frame's `attrs["counts"]` holds its DataCounts, carried on to tokenization and metrics.json.
    """
    from tunewright.data import split_frame

    if validation is None:
        parts = split_frame(frame, config.preprocessing, config.trainer.seed)
        sources = {name: f"{source} ({name} split)" for name in ("train", "validation", "test")}
    else:
        parts = Splits(frame, validation, frame.iloc[0:0])
        sources = {"train": source, "validation": validation_source, "test": source}
    frames = {}
    for name in ("train", "validation", "test"):
        raw = getattr(parts, name)
        normalised, counts = preference_frame(raw, config, sources[name]) if len(raw) else (raw, DataCounts())
        normalised.attrs["counts"] = counts
        frames[name] = normalised
    if len(frames["train"]) == 0:
        raise DataError(f"{source}: the training split holds no usable pair; add rows or change preprocessing.split")
    return Splits(frames["train"], frames["validation"], frames["test"])


def preference_fingerprint(config: TunewrightConfig, splits: Splits) -> dict[str, str]:
    """What run_fingerprint does not cover: the trainer, the rejected/label column, the preference section."""
    column = config.preference.label_column if config.trainer.type == "kto" else config.preference.rejected_column
    return {"trainer.type": config.trainer.type,
            "preference.max_length": json.dumps(config.preference.max_length),
            "dataset.train.second": frame_hash(splits.train[[column]]),
            "dataset.validation.second": frame_hash(splits.validation[[column]]) if len(splits.validation) else ""}


def frozen(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def load_reference(config: TunewrightConfig, device: torch.device) -> Reference:
    """preference.reference as a frozen model, or (None) the policy with its adapter disabled."""
    path = config.preference.reference
    if path is None or config.trainer.type not in ("dpo", "kto"):
        return Reference()
    from tunewright.loading import load  # a run folder's loader sits above this module
    from tunewright.model import load_base_model
    from tunewright.run import STATUS_FILE

    if not Path(path).exists():
        raise ConfigError(f"preference.reference: '{path}' does not exist; give a run folder or a model folder")
    model = load(path).model if (Path(path) / STATUS_FILE).is_file() else \
        load_base_model(path, config.backend, None, device).model
    return Reference(frozen(model.to(device)))


@dataclass
class PreferenceFit:
    objective: PreferenceObjective
    train: list[PreferenceExample]
    validation: list[PreferenceExample]
    batching: Batching
    summary: dict[str, Any]


def prepare_preference_fit(model: nn.Module, tokenizer: Any, config: TunewrightConfig, splits: Splits,
                           accelerator: Accelerator, run_dir: Path) -> PreferenceFit:
    """The objective, tokenized pairs (with cached reference log-probs for DPO) and fit()'s batching."""
    counts = {name: getattr(splits, name).attrs.get("counts", DataCounts()) for name in ("train", "validation")}
    train = build_preference_examples(splits.train, config, tokenizer, counts["train"], "training split").examples
    validation = build_preference_examples(splits.validation, config, tokenizer, counts["validation"],
                                           "validation split").examples if len(splits.validation) else []
    reference = load_reference(config, accelerator.device)
    objective = PreferenceObjective(model, config.trainer.type, config.preference, reference)
    summary: dict[str, Any] = {"pairs": {name: count.as_dict() for name, count in counts.items() if count.rows}}
    if config.trainer.type == "dpo" and config.preference.cache_reference:
        summary["reference_cache"] = cache_reference_logps([train, validation], model, reference, config, tokenizer,
                                                           accelerator, run_dir.parent / CACHE_DIR)
    kto = config.trainer.type == "kto"
    batching = Batching(
        collate=partial(collate_pairs, kto=kto),
        begin_window=lambda examples, indices: _begin_window(objective, indices),
        step_metrics=objective.take_step_metrics,
        evaluate=partial(evaluate_pairs, kto=kto),
    )
    return PreferenceFit(objective, train, validation, batching, summary)


def _begin_window(objective: PreferenceObjective, indices: list[int]) -> int:
    objective.take_step_metrics()  # a retried step (out of memory) counts its pairs once
    return len(indices)


def cache_reference_logps(example_sets: list[list[PreferenceExample]], model: nn.Module, reference: Reference,
                          config: TunewrightConfig, tokenizer: Any, accelerator: Accelerator,
                          cache_dir: Path) -> list[str]:
    identity = reference_identity(config.base_model, config.preference.reference, base_model(model).dtype)
    batch_size = config.trainer.eval_batch_size or config.trainer.batch_size
    return [attach_reference_logps(examples, model, reference, identity, cache_dir, batch_size,
                                   tokenizer.pad_token_id, accelerator.device, accelerator.is_main_process)
            for examples in example_sets]


def evaluate_preference(model: nn.Module, tokenizer: Any, config: TunewrightConfig, frame: pd.DataFrame,
                        source: str) -> dict[str, Any]:
    """Loss, reward accuracy, margin and chosen/rejected log-probs on held-out pairs (no category metrics)."""
    frame, counts = preference_frame(frame, config, source)
    examples = build_preference_examples(frame, config, tokenizer, counts, source).examples
    device = next(model.parameters()).device
    objective = PreferenceObjective(model, config.trainer.type, config.preference,
                                    load_reference(config, device))
    batch_size = config.trainer.eval_batch_size or config.trainer.batch_size
    metrics = evaluate_pairs(objective, examples, batch_size, tokenizer.pad_token_id, None,
                             config.trainer.type == "kto")
    return {**metrics, "rows": len(examples)}


def continue_reference(config: TunewrightConfig, previous_run: Path | None) -> TunewrightConfig:
    """With --from-run, DPO/KTO compare against the run continued from (the supervised model), unless
    preference.reference names another; the saved config records it."""
    if previous_run is None or config.trainer.type not in ("dpo", "kto") or config.preference.reference is not None:
        return config
    preference = config.preference.model_copy(update={"reference": str(previous_run)})
    return config.model_copy(update={"preference": preference})


def preference_summary(config: TunewrightConfig, fitted: PreferenceFit, history: list[dict[str, Any]]
                       ) -> dict[str, Any]:
    """metrics.json's training entry: the trainer, the data counts, and the last step's reward figures."""
    summary: dict[str, Any] = {"type": config.trainer.type, **fitted.summary}
    trained = [record for record in history if "reward_accuracy" in record]
    if trained:
        summary.update({f"train_{name}": trained[-1][name] for name in STAT_NAMES})
    return summary
