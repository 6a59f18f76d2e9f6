"""The training half of `train`: the splits, their tokenised examples, fit() and the metrics of each split.

api.train opens the run folder and loads the model; this module trains it: what fit() gets for a
supervised run (the LM objective or the category classifier) or a preference run (preference_training.py),
and the metrics written for the validation and test splits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel

from tunewright.adapters import attach_adapter, count_parameters, load_adapter, optimizer_step_hook
from tunewright.chat_data import check_mask_stats, conversation_examples, frame_conversations
from tunewright.checkpoint import CHECKPOINT_DIR, load_checkpoint
from tunewright.config import TunewrightConfig
from tunewright.data import (
    Dataset,
    Splits,
    as_frame,
    build_examples,
    check_columns,
    drop_missing_targets,
    encode_prompts,
    fit_prompts,
    split_frame,
)
from tunewright.errors import DataError
from tunewright.evaluate import evaluate_frame, write_confusion_matrix, write_evaluated_rows
from tunewright.few_shot import FewShotIndex
from tunewright.heads import (
    classifier_examples,
    label_indices,
    label_texts,
    label_vocabulary,
)
from tunewright.model import (
    LoadedModel,
    enable_gradient_checkpointing,
)
from tunewright.objective import LanguageModelObjective
from tunewright.predictor import TunedModel, attach_category
from tunewright.preference_training import (
    evaluate_preference,
    is_preference,
    preference_splits,
    preference_summary,
    prepare_preference_fit,
)
from tunewright.progress import log_phase
from tunewright.report_data import predictions_file
from tunewright.run import (
    append_log,
    weights_kind,
)
from tunewright.selection import GenerationScorer
from tunewright.tracking import start_tracking
from tunewright.train import Batching, LogFn, fit, total_optimizer_steps
from tunewright.validation_metric import generation_scorer

if TYPE_CHECKING:  # api.py imports this module
    from tunewright.api import EvaluationMetrics

log = logging.getLogger(__name__)


def load_splits(config: TunewrightConfig, dataset: Dataset, validation: Dataset | None) -> Splits:
    frame, source = as_frame(dataset)
    if is_preference(config):
        validation_frame, validation_source = as_frame(validation, "validation dataset") if validation is not None \
            else (None, "")
        return preference_splits(config, frame, source, validation_frame, validation_source)
    needed = [*config.input_columns, config.output_feature.name]
    check_columns(frame, needed, source)
    frame = drop_missing_targets(frame, config.output_feature.name, source)
    if validation is None:
        splits = split_frame(frame, config.preprocessing, config.trainer.seed)
    else:
        validation_frame, validation_source = as_frame(validation, "validation dataset")
        check_columns(validation_frame, needed, validation_source)
        validation_frame = drop_missing_targets(validation_frame, config.output_feature.name, validation_source)
        splits = Splits(frame, validation_frame, frame.iloc[0:0])
    if len(splits.train) == 0 and config.trainer.type == "finetune":
        raise DataError(f"{source}: the training split is empty; add rows or change preprocessing.split")
    return splits


def training_examples(tuned: TunedModel, frame: pd.DataFrame, split: str) -> list[Any]:
    started = time.perf_counter()
    examples = tokenise(tuned, frame, in_pool=split == "training")
    log_phase(f"tokenised {len(examples):,} {split} rows", started)
    return examples


def tokenise(tuned: TunedModel, frame: pd.DataFrame, in_pool: bool = False) -> list[Any]:
    """Examples to fit; `in_pool`: the frame is the training split (no row is its own few-shot example)."""
    config = tuned.config
    if config.conversation is not None:
        conversations = frame_conversations(frame, config.conversation)
        examples, stats = conversation_examples(tuned.tokenizer, conversations, config, tuned.max_sequence_len)
        check_mask_stats(stats, "dataset")
        return examples
    prompt_ids = encode_prompts(tuned.render_frame(frame, in_pool), tuned.tokenizer, config.prompt.use_chat_template)
    prompt_ids, kept = fit_prompts(prompt_ids, tuned.max_input_len, config.preprocessing.overlong_prompts)
    targets = [str(frame[config.output_feature.name].iloc[row]) for row in kept]
    if tuned.labels is not None:
        targets = label_texts(targets, config.output_feature.name, "dataset")
        if tuned.classifier is not None:
            return classifier_examples(prompt_ids, label_indices(targets, tuned.labels))
    return build_examples(prompt_ids, targets, tuned.tokenizer, config.preprocessing.max_target_length)


def category_vocabulary(config: TunewrightConfig, splits: Splits) -> list[str] | None:
    """Category outputs: the label set (config or training data), checked before any model loads."""
    feature = config.output_feature
    if feature.type != "category":
        return None
    seen = [*splits.train[feature.name], *splits.validation[feature.name]]
    return label_vocabulary(feature, label_texts(seen, feature.name, "dataset"), "dataset")


@dataclass
class FitInputs:
    """What fit() trains: the objective, the examples of both splits, and how batches are built."""

    objective: nn.Module
    train: Sequence[Any]
    validation: Sequence[Any]
    scorer: GenerationScorer | None  # generated validation metrics (selection.py), supervised runs only
    batching: Batching | None  # preference runs batch pairs (preference_training.py)


def what_to_fit(tuned: TunedModel, splits: Splits) -> FitInputs:
    """A supervised run: the LM objective (or the category classifier) on the tokenised splits."""
    validation = training_examples(tuned, splits.validation, "validation") if len(splits.validation) else []
    return FitInputs(tuned.classifier or LanguageModelObjective(tuned.model, tuned.config.trainer.fused_loss),
                     training_examples(tuned, splits.train, "training"), validation,
                     generation_scorer(tuned, splits.validation), None)


def fine_tune(config: TunewrightConfig, loaded: LoadedModel, splits: Splits, vocabulary: list[str] | None,
               previous_run: Path | None, accelerator: Accelerator, run_dir: Path, fingerprint: dict[str, str],
               checkpoint: Path | None, show_progress: bool, on_validation: LogFn | None = None,
               few_shot: FewShotIndex | None = None,
               calibration_inputs: pd.DataFrame | None = None) -> tuple[TunedModel, dict[str, Any]]:
    """Wrap the model for training, run fit(), and save the trained weights into the run folder."""
    planned_steps = total_optimizer_steps(len(splits.train), config.trainer, accelerator.num_processes)
    trainable = trainable_model(loaded.model, config, planned_steps, previous_run)
    tuned = TunedModel(trainable, loaded.tokenizer, config, few_shot=few_shot, calibration_inputs=calibration_inputs)
    if config.trainer.gradient_checkpointing:
        enable_gradient_checkpointing(tuned.model)
    if vocabulary is not None:
        attach_category(tuned, vocabulary)
    report = count_parameters(tuned.classifier or tuned.model)
    start_tracking(accelerator, config, run_dir, {"trainable": report.trainable, "total": report.total})
    started = time.perf_counter()

    def on_log(record: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            append_log(run_dir, record)
        if on_validation is not None and "val_loss" in record:
            on_validation(record)

    preference = prepare_preference_fit(tuned.model, loaded.tokenizer, config, splits, accelerator, run_dir) \
        if is_preference(config) else None
    what = what_to_fit(tuned, splits) if preference is None else FitInputs(
        preference.objective, preference.train, preference.validation, None, preference.batching)
    result = fit(
        what.objective, what.train, what.validation, config.trainer, accelerator, loaded.tokenizer.pad_token_id,
        on_log=on_log,
        show_progress=show_progress,
        after_optimizer_step=optimizer_step_hook(tuned.model),
        checkpoint_dir=run_dir / CHECKPOINT_DIR,
        fingerprint=fingerprint,
        resume=load_checkpoint(checkpoint) if checkpoint is not None else None,
        score_generation=what.scorer,
        batching=what.batching,
    )
    log_phase(f"trained {result.steps} optimizer steps", started)  # (its time includes tokenising the data)
    tuned.model = accelerator.unwrap_model(tuned.model)
    if accelerator.is_main_process:
        tuned.model.save_pretrained(run_dir, safe_serialization=True)
    summary = {"type": "finetune", "trainable_parameters": report.trainable, "total_parameters": report.total,
               "steps": result.steps, "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
               "eval_metric": config.trainer.eval_metric, "best_eval_metric": result.best_metric,
               "best_step": result.best_step}
    if result.time_budget is not None:
        summary["time_budget"] = result.time_budget
    if preference is not None:
        summary.update(preference_summary(config, preference, result.history))
    return tuned, summary


def split_metrics(tuned: TunedModel, splits: Splits, run_dir: Path, accelerator: Accelerator,
                   show_progress: bool) -> dict[str, EvaluationMetrics]:
    """Metrics on the validation and test splits (and confusion-matrix pictures for categories)."""
    metrics: dict[str, Any] = {}
    for split_name in ("validation", "test"):
        frame = getattr(splits, split_name)
        if len(frame) and is_preference(tuned.config):
            metrics[split_name] = evaluate_preference(tuned.model, tuned.tokenizer, tuned.config, frame, split_name)
        elif len(frame):
            evaluation = evaluate_frame(tuned, frame, show_progress, split_name)
            metrics[split_name] = evaluation.metrics
            if accelerator.is_main_process:
                write_evaluated_rows(tuned, evaluation, run_dir / predictions_file(split_name))
            if "confusion_matrix" in metrics[split_name] and accelerator.is_main_process:
                write_confusion_matrix(metrics[split_name], run_dir / f"confusion_matrix_{split_name}.png")
    return metrics


def trainable_model(
    model: PreTrainedModel, config: TunewrightConfig, total_steps: int, from_run: Path | None = None
) -> nn.Module:
    """The model ready to train: a fresh adapter, the saved adapter of `from_run` made trainable, or
    (full fine-tuning) the model's own weights with the chosen ones unfrozen."""
    if from_run is not None and weights_kind(from_run) == "adapter":
        wrapped = load_adapter(model, str(from_run), trainable=True)
        log.info("continuing from %s: %s", from_run, count_parameters(wrapped))
        return wrapped
    return attach_adapter(model, config.adapter, total_steps)
