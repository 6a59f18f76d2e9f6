"""Evaluation: data -> forward pass (loss) + generation -> metrics."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tunewright.data import build_examples, check_columns, drop_null_rows
from tunewright.generate import generate_ids
from tunewright.metrics import generated_token_accuracy, text_metrics
from tunewright.objective import LanguageModelObjective
from tunewright.predictor import PREDICTION_COLUMN, TunedModel
from tunewright.train import evaluate_loss


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: pd.DataFrame  # the evaluated rows with a `prediction` column


def prepare_labelled(tuned: TunedModel, frame: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """Rows with every input and the output present; missing columns are errors, empty cells are dropped."""
    needed = [*tuned.config.input_columns, tuned.config.output_feature.name]
    check_columns(frame, needed, source)
    return drop_null_rows(frame, needed, source)


def evaluate_text(tuned: TunedModel, frame: pd.DataFrame, batch_size: int, show_progress: bool = False) -> Evaluation:
    """Loss, perplexity and token accuracy (teacher forced), then generation metrics against the targets."""
    output_column = tuned.config.output_feature.name
    targets = [str(value) for value in frame[output_column]]
    prompt_ids = tuned.encode_frame(frame)
    examples = build_examples(prompt_ids, targets, tuned.tokenizer)
    metrics = evaluate_loss(LanguageModelObjective(tuned.model), examples, batch_size, tuned.tokenizer.pad_token_id)
    generated = generate_ids(tuned.model, tuned.tokenizer, prompt_ids, tuned.config.generation, show_progress)
    texts = [text.strip() for text in tuned.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    target_ids = tuned.tokenizer(targets, add_special_tokens=False)["input_ids"]
    metrics["generated_token_accuracy"] = generated_token_accuracy(generated, target_ids, tuned.tokenizer.pad_token_id)
    metrics.update(text_metrics(texts, targets))
    predictions = frame.copy()
    predictions[PREDICTION_COLUMN] = texts
    return Evaluation(metrics=metrics, predictions=predictions)


def evaluate_frame(tuned: TunedModel, frame: pd.DataFrame, show_progress: bool = False,
                   source: str = "dataset") -> Evaluation:
    """Evaluate on labelled rows with the metrics that fit the output feature's type."""
    frame = prepare_labelled(tuned, frame, source)
    batch_size = tuned.config.trainer.eval_batch_size or tuned.config.trainer.batch_size
    evaluation = evaluate_text(tuned, frame, batch_size, show_progress)
    evaluation.metrics["rows"] = float(len(frame))
    return evaluation
