"""The generated validation metrics that a generated trainer.eval_metric needs, scored by evaluate.py.

fit() calls the scorer at each validation (see selection.py). It evaluates the first
trainer.eval_max_rows validation rows exactly as `tunewright evaluate` does (batched generation, or
label scoring for categories) with the weights of the moment, so the value that chose the kept
weights is the value those weights score afterwards.
"""

from __future__ import annotations

import pandas as pd

from tunewright.config import TEACHER_FORCED_METRICS
from tunewright.evaluate import evaluate_frame
from tunewright.predictor import TunedModel
from tunewright.selection import GenerationScorer

# fit() has these over every validation row; evaluate_frame reports them over the capped rows too.
NOT_GENERATED = {"loss", "perplexity", "token_accuracy", "rows", "unseen_label_rows"}


def generation_scorer(tuned: TunedModel, validation: pd.DataFrame) -> GenerationScorer | None:
    """A scorer for fit(), or None when trainer.eval_metric is teacher forced or there is no validation split."""
    cfg = tuned.config.trainer
    if cfg.eval_metric in TEACHER_FORCED_METRICS or not len(validation):
        return None
    rows = validation.head(cfg.eval_max_rows)

    def score() -> dict[str, float]:
        tuned.label_prior = None  # calibration: rows: the prior of the weights of the moment
        metrics = evaluate_frame(tuned, rows, source="validation").metrics
        return {name: float(value) for name, value in metrics.items()
                if name not in NOT_GENERATED and isinstance(value, int | float)}

    return score
