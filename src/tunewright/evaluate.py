"""Evaluation: data -> forward pass (loss) + generation -> metrics."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tunewright.chat_data import check_mask_stats, conversation_examples, frame_conversations, last_replies
from tunewright.data import build_examples, check_columns, drop_missing_targets, write_table
from tunewright.generate import generate_ids
from tunewright.heads import label_texts
from tunewright.metrics import category_metrics, generated_token_accuracy, label_cross_entropy, text_metrics
from tunewright.objective import LanguageModelObjective, evaluate_loss
from tunewright.predictor import PREDICTION_COLUMN, PROBABILITY_COLUMN, TunedModel
from tunewright.preference_training import evaluate_preference, is_preference
from tunewright.progress import log_phase

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # floats; category outputs add nested per-class and confusion-matrix entries
    predictions: pd.DataFrame  # the evaluated rows with a `prediction` column


def prepare_labelled(tuned: TunedModel, frame: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """Missing columns are errors; rows with an empty target are dropped, empty inputs are kept (as "")."""
    needed = [*tuned.config.input_columns, tuned.config.output_feature.name]
    check_columns(frame, needed, source)
    return drop_missing_targets(frame, tuned.config.output_feature.name, source)


def evaluate_text(tuned: TunedModel, frame: pd.DataFrame, batch_size: int,
                  show_progress: bool = False) -> Evaluation:
    """Loss, perplexity and token accuracy (teacher forced), then generation metrics against the targets."""
    output_column = tuned.config.output_feature.name
    targets = [str(value) for value in frame[output_column]]
    prompt_ids = tuned.encode_frame(frame)
    examples = build_examples(prompt_ids, targets, tuned.tokenizer)
    pad_id = tuned.tokenizer.pad_token_id
    started = time.perf_counter()
    metrics = evaluate_loss(LanguageModelObjective(tuned.model), examples, batch_size, pad_id)
    log_phase(f"loss over {len(examples):,} rows", started)
    generated = generate_ids(tuned.model, tuned.tokenizer, prompt_ids, tuned.config.generation, show_progress)
    texts = [text.strip() for text in tuned.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    target_ids = tuned.tokenizer(targets, add_special_tokens=False)["input_ids"]
    metrics["generated_token_accuracy"] = generated_token_accuracy(generated, target_ids, pad_id)
    metrics.update(text_metrics(texts, targets))
    predictions = frame.copy()
    predictions[PREDICTION_COLUMN] = texts
    return Evaluation(metrics=metrics, predictions=predictions)


def evaluate_conversation(tuned: TunedModel, frame: pd.DataFrame, batch_size: int,
                          show_progress: bool = False, source: str = "dataset") -> Evaluation:
    """Loss on the training masks (every trained token), then each final assistant turn generated from its history."""
    assert tuned.config.conversation is not None
    conversations = frame_conversations(frame, tuned.config.conversation, source)
    examples, stats = conversation_examples(tuned.tokenizer, conversations, tuned.config, tuned.max_sequence_len)
    check_mask_stats(stats, source)
    metrics = evaluate_loss(LanguageModelObjective(tuned.model), examples, batch_size, tuned.tokenizer.pad_token_id)
    prompt_ids = tuned.encode_conversations(conversations)
    generated = generate_ids(tuned.model, tuned.tokenizer, prompt_ids, tuned.config.generation, show_progress)
    texts = [text.strip() for text in tuned.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    targets = last_replies(conversations)
    target_ids = tuned.tokenizer(targets, add_special_tokens=False)["input_ids"]
    metrics["generated_token_accuracy"] = generated_token_accuracy(generated, target_ids, tuned.tokenizer.pad_token_id)
    metrics.update(text_metrics(texts, targets))
    predictions = frame.copy()
    predictions[PREDICTION_COLUMN] = texts
    return Evaluation(metrics=metrics, predictions=predictions)


def evaluate_category(tuned: TunedModel, frame: pd.DataFrame, source: str = "dataset",
                      show_progress: bool = False) -> Evaluation:
    """Label probabilities -> classification metrics, ECE and the label cross-entropy as the loss.

    Gold labels the model has never seen are counted in a warning and scored as errors; they have
    no probability, so the loss is taken over the other rows.
    """
    assert tuned.labels is not None
    column = tuned.config.output_feature.name
    targets = label_texts(frame[column], column, source)
    predictions, log_probs = tuned.predict_labels(frame, show_progress)
    index = {label: position for position, label in enumerate(tuned.labels)}
    unseen = Counter(label for label in targets if label not in index)
    if unseen:
        listed = ", ".join(f"{label!r} x{count}" for label, count in unseen.most_common(5))
        log.warning("%s: %d of %d row(s) have label(s) the model was not trained on (%s); "
                    "they count as errors", source, sum(unseen.values()), len(targets), listed)
    metrics = category_metrics(predictions[PREDICTION_COLUMN].tolist(), targets,
                               predictions[PROBABILITY_COLUMN].tolist(), tuned.labels)
    loss = label_cross_entropy(log_probs.tolist(), [index.get(label) for label in targets])
    metrics = {"loss": loss, **metrics, "unseen_label_rows": sum(unseen.values())}
    return Evaluation(metrics=metrics, predictions=predictions)


def write_evaluated_rows(tuned: TunedModel, evaluation: Evaluation, path: Path) -> None:
    """The rows' inputs, target and prediction (and its probability), for the report and for reading."""
    config = tuned.config
    wanted = [*config.input_columns, config.output_feature.name, PREDICTION_COLUMN, PROBABILITY_COLUMN]
    frame = evaluation.predictions
    write_table(frame[[column for column in dict.fromkeys(wanted) if column in frame.columns]], path)


def write_confusion_matrix(metrics: dict[str, Any], path: Path, title: str = "confusion matrix") -> bool:
    """Draw `metrics["confusion_matrix"]` as a PNG (matplotlib, the `plot` extra); False if unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'tunewright[plot]'); skipped %s", path)
        return False
    labels = metrics["confusion_matrix"]["labels"]
    matrix = metrics["confusion_matrix"]["matrix"]
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center",
                      color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def evaluate_frame(tuned: TunedModel, frame: pd.DataFrame, show_progress: bool = False,
                   source: str = "dataset") -> Evaluation:
    """Evaluate on labelled rows with the metrics that fit the output feature's type."""
    started = time.perf_counter()
    if is_preference(tuned.config):  # held-out pairs: reward accuracy and margin, no generation
        return Evaluation(evaluate_preference(tuned.model, tuned.tokenizer, tuned.config, frame, source), frame)
    frame = prepare_labelled(tuned, frame, source)
    batch_size = tuned.config.trainer.eval_batch_size or tuned.config.trainer.batch_size
    if tuned.is_category:
        evaluation = evaluate_category(tuned, frame, source, show_progress)
    elif tuned.config.conversation is not None:
        evaluation = evaluate_conversation(tuned, frame, batch_size, show_progress, source)
    else:
        evaluation = evaluate_text(tuned, frame, batch_size, show_progress)
    evaluation.metrics["rows"] = len(frame)  # a count: an int in the JSON too
    log_phase(f"evaluated {len(frame):,} rows of {source}", started)
    return evaluation
