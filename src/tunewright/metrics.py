"""Metrics as pure functions: (predictions, targets) -> dict[str, float], using established libraries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import sacrebleu
from rouge_score import rouge_scorer
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
