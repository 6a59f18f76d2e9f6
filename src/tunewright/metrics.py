"""Metrics as pure functions: (predictions, targets) -> dict[str, float], using established libraries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torchmetrics.functional.classification import binary_calibration_error
from torchmetrics.functional.text import char_error_rate


def realign(
    predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int,
    side: Literal["left", "right"] = "right",
) -> tuple[list[list[int]], list[list[int]]]:
    """Pad each prediction/target pair to a common length, so token positions can be compared."""
    aligned_predictions, aligned_targets = [], []
    for prediction, target in zip(predictions, targets, strict=True):
        width = max(len(prediction), len(target))
        fill_prediction = [pad_id] * (width - len(prediction))
        fill_target = [pad_id] * (width - len(target))
        if side == "right":
            aligned_predictions.append([*prediction, *fill_prediction])
            aligned_targets.append([*target, *fill_target])
        else:
            aligned_predictions.append([*fill_prediction, *prediction])
            aligned_targets.append([*fill_target, *target])
    return aligned_predictions, aligned_targets


def generated_token_accuracy(
    predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int
) -> float:
    """Share of target positions where the generated token equals the target token (right-aligned pad)."""
    aligned_predictions, aligned_targets = realign(predictions, targets, pad_id)
    matched = total = 0
    for prediction, target, original in zip(aligned_predictions, aligned_targets, targets, strict=True):
        total += max(1, len(original))
        matched += sum(p == t for p, t in zip(prediction[: len(original)], target[: len(original)], strict=True))
    return matched / total if total else 0.0


def text_metrics(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Exact match, corpus BLEU (sacrebleu), mean ROUGE-L F1 and character error rate."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return {}
    predictions = [p.strip() for p in predictions]
    targets = [t.strip() for t in targets]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge_l = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predictions, targets, strict=True)]
    cer = float(char_error_rate(list(predictions), list(targets)))
    return {
        "exact_match": sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets),
        "bleu": float(sacrebleu.corpus_bleu(predictions, [targets]).score),
        "rouge_l": sum(rouge_l) / len(rouge_l),
        "char_error_rate": cer,
    }


# --- category outputs ------------------------------------------------------------------------------


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], num_bins: int = 10
) -> float:
    """ECE (Guo et al., 2017): the |accuracy - confidence| gap of equal-width confidence bins, weighted by size.

    torchmetrics' binary form computes exactly this when `preds` is the predicted label's probability and
    `target` says whether that label was right.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} outcomes")
    if not confidences:
        return 0.0
    error = binary_calibration_error(
        torch.tensor(confidences, dtype=torch.float64), torch.tensor(correct, dtype=torch.long),
        n_bins=num_bins, norm="l1",
    )
    return float(error)


def label_cross_entropy(
    log_probs: Sequence[Sequence[float]], target_indices: Sequence[int | None]
) -> float | None:
    """Mean −log p(gold label) over rows whose gold label is known (None: unseen label, skipped)."""
    pairs = zip(log_probs, target_indices, strict=True)
    values = [-float(row[index]) for row, index in pairs if index is not None]
    return sum(values) / len(values) if values else None


def category_metrics(
    predictions: Sequence[str], targets: Sequence[str], confidences: Sequence[float], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and ECE (scikit-learn).

    Targets outside `labels` (unseen at training time) count as errors: they lower accuracy and
    appear as extra rows of the confusion matrix, after the known labels.

    Args:
        predictions: the predicted label of each row.
        targets: the gold label of each row.
        confidences: the predicted label's probability for each row.
        labels: the label vocabulary, in model order.
    """
    if not (len(predictions) == len(targets) == len(confidences)):
        raise ValueError(
            f"{len(predictions)} predictions, {len(targets)} targets, {len(confidences)} confidences"
        )
    if not targets:
        return {}
    known = list(labels)
    unseen = sorted(set(targets) - set(known))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=known, average=None, zero_division=0
    )
    matrix = confusion_matrix(targets, predictions, labels=[*known, *unseen])
    correct = [p == t for p, t in zip(predictions, targets, strict=True)]
    return {
        "accuracy": float(accuracy_score(targets, predictions)),
        "macro_f1": float(f1_score(targets, predictions, labels=known, average="macro", zero_division=0)),
        "expected_calibration_error": expected_calibration_error(list(confidences), correct),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(known, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": {"labels": [*known, *unseen], "matrix": matrix.tolist()},
    }
