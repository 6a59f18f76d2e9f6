"""Model selection inside fit(): every validation metric, the best weights by trainer.eval_metric, early stopping.

The teacher-forced loss and token accuracy cover every validation row. A generated eval_metric
(exact_match, bleu, accuracy, ...) comes from a scorer the caller passes (validation_metric.py),
which generates on the first trainer.eval_max_rows validation rows with the weights of the moment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn

from tunewright.checkpoint import TrainerState, capture_rng_state, restore_rng_state
from tunewright.config import EVAL_METRICS, TEACHER_FORCED_METRICS, TrainerConfig
from tunewright.data import Example
from tunewright.errors import ConfigError, RunFolderError
from tunewright.objective import evaluate_loss

if TYPE_CHECKING:
    from tunewright.train import Session, StepContext

log = logging.getLogger(__name__)

GenerationScorer = Callable[[], dict[str, float]]  # the generated metrics of the capped validation rows


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (what early stopping restores)."""
    names = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items() if name in names}


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best` in the metric's direction (EVAL_METRICS); ties keep the earlier one."""
    if best is None:
        return True
    return value > best if EVAL_METRICS[metric][0] == "max" else value < best


def check_scorer(cfg: TrainerConfig, has_validation: bool, scorer: GenerationScorer | None) -> None:
    if has_validation and cfg.eval_metric not in TEACHER_FORCED_METRICS and scorer is None:
        raise ConfigError(f"trainer.eval_metric: '{cfg.eval_metric}' is generated at each validation, and fit() "
                          "got no scorer; pass score_generation (validation_metric.generation_scorer)")


def adopt_selection_state(state: TrainerState, cfg: TrainerConfig, checkpoint: Path | None) -> None:
    """Mark the state with this run's eval_metric; a resumed state must have chosen its best by the same one."""
    if checkpoint is not None:
        if state.eval_metric is None:  # written before eval_metric existed: chosen by validation loss
            state.eval_metric, state.best_metric = "loss", state.best_val_loss
        if state.eval_metric != cfg.eval_metric:
            raise RunFolderError(
                f"{checkpoint}: its best weights were chosen by trainer.eval_metric '{state.eval_metric}', not "
                f"'{cfg.eval_metric}'; resume with eval_metric: {state.eval_metric}, or pass --overwrite"
            )
    state.eval_metric = cfg.eval_metric


@contextmanager
def generation_mode(objective: nn.Module) -> Iterator[None]:
    """No dropout while generating, and the random state left as it was (a resumed run draws the same)."""
    rng, was_training = capture_rng_state(), objective.training
    objective.eval()
    try:
        yield
    finally:
        objective.train(was_training)
        restore_rng_state(rng)


def validation_metrics(ctx: StepContext, examples: Sequence[Example],
                       scorer: GenerationScorer | None) -> dict[str, float]:
    """The loss and token accuracy over every validation row, then the generated metrics (if any)."""
    if ctx.batching is not None:  # preference pairs: their own loss and reward figures
        with ctx.autocast:
            return ctx.batching.evaluate(ctx.objective, examples, ctx.cfg.eval_batch_size or ctx.cfg.batch_size,
                                         ctx.pad_id, ctx.accelerator)
    with ctx.autocast:  # the training precision: frozen weights may be bf16 here
        teacher_forced = evaluate_loss(ctx.objective, examples, ctx.cfg.eval_batch_size or ctx.cfg.batch_size,
                                       ctx.pad_id, ctx.accelerator)
    metrics = {name: teacher_forced[name] for name in TEACHER_FORCED_METRICS}
    if scorer is not None:
        with ctx.autocast, generation_mode(ctx.objective):
            metrics.update(scorer())
    return metrics


def track_best(state: TrainerState, metrics: dict[str, float], metric: str, objective: nn.Module,
               accelerator: Accelerator, best_weights: dict[str, torch.Tensor] | None
               ) -> dict[str, torch.Tensor] | None:
    """Early-stopping bookkeeping by `metric`; returns the best weights so far."""
    if state.best_val_loss is None or metrics["loss"] < state.best_val_loss:
        state.best_val_loss = metrics["loss"]
    if is_better(metrics[metric], state.best_metric, metric):
        state.best_metric, state.best_step = metrics[metric], state.step
        state.evals_without_improvement = 0
        return trainable_state(accelerator.unwrap_model(objective))
    state.evals_without_improvement += 1
    return best_weights


def validate(ctx: StepContext, session: Session, record: dict[str, Any], examples: Sequence[Example],
             scorer: GenerationScorer | None) -> None:
    """Every validation metric into `record` (as val_<name>), the best weights so far, and early stopping."""
    metrics = validation_metrics(ctx, examples, scorer)
    record.update({f"val_{name}": value for name, value in metrics.items()})
    state, metric = session.state, ctx.cfg.eval_metric
    session.best_weights = track_best(state, metrics, metric, ctx.objective, ctx.accelerator, session.best_weights)
    patience = ctx.cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        log.info("Early stopping at step %d: no better validation %s in %d evaluations",
                 state.step, metric, state.evals_without_improvement)
        state.stopped_early = True
