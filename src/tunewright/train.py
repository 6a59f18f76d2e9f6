"""fit(): a readable training loop on Accelerate (so `accelerate launch` scales it unchanged)."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from tunewright.config import TrainerConfig
from tunewright.data import IGNORE_INDEX, Example, collate_training
from tunewright.errors import TrainingError
from tunewright.objective import LossOutput
from tunewright.progress import NullProgress, TrainingProgress

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    steps: int
    best_val_loss: float | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then constant / linear / cosine decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of example indices; a pure function of (seed, epoch) so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]


def optimizer_windows(num_examples: int, cfg: TrainerConfig, world_size: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (epoch, micro-batches of one optimizer step across all processes), forever over epochs."""
    per_step = cfg.gradient_accumulation_steps * world_size
    epoch = 0
    while True:
        batches = epoch_batches(num_examples, cfg.batch_size, cfg.seed, epoch)
        for start in range(0, len(batches), per_step):
            yield epoch, batches[start : start + per_step]
        epoch += 1


def total_optimizer_steps(num_examples: int, cfg: TrainerConfig, world_size: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches = math.ceil(num_examples / cfg.batch_size)
    return math.ceil(batches / (cfg.gradient_accumulation_steps * world_size)) * cfg.epochs


def regularization_penalty(parameters: Sequence[nn.Parameter], cfg: TrainerConfig) -> torch.Tensor | None:
    if cfg.regularization is None or cfg.regularization_lambda == 0:
        return None
    penalty = torch.zeros((), device=parameters[0].device)
    for parameter in parameters:
        if cfg.regularization in ("l1", "l1_l2"):
            penalty = penalty + parameter.abs().sum()
        if cfg.regularization in ("l2", "l1_l2"):
            penalty = penalty + parameter.pow(2).sum()
    return cfg.regularization_lambda * penalty


def target_token_count(examples: Sequence[Example], indices: Sequence[int]) -> int:
    # The first token can never be a target (nothing predicts it), hence labels[1:].
    return sum(sum(label != IGNORE_INDEX for label in examples[i].labels[1:]) for i in indices)


@torch.no_grad()
def evaluate_loss(objective: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  accelerator: Accelerator | None = None) -> dict[str, float]:
    """Mean loss per target token over `examples`, with perplexity and teacher-forced token accuracy.

    With an accelerator, each process scores its shard and the sums are reduced across processes.
    """
    was_training = objective.training
    objective.eval()
    device = accelerator.device if accelerator else next(objective.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, count, correct
    shard = list(range(rank, len(examples), world))
    for start in range(0, len(shard), batch_size):
        batch = collate_training([examples[i] for i in shard[start : start + batch_size]], pad_id)
        out: LossOutput = objective(**{k: v.to(device) for k, v in batch.items()})
        totals += torch.stack([out.loss_sum.double(), out.count.double(), out.correct.double()])
    if accelerator:
        totals = accelerator.reduce(totals, reduction="sum")
    objective.train(was_training)
    count = totals[1].clamp(min=1)
    loss = (totals[0] / count).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": (totals[2] / count).item()}


def fit(
    objective: nn.Module,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: TrainerConfig,
    accelerator: Accelerator,
    pad_id: int,
    on_log: LogFn | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train the trainable parameters of `objective` and keep the best validation weights.

    The loss of every optimizer step is the sum over its target tokens divided by the number of
    target tokens in the whole accumulation window (on every process), so accumulation and
    padding never change its value.
    """
    torch.manual_seed(cfg.seed)
    parameters = trainable_parameters(objective)
    if not parameters:
        raise TrainingError("nothing to train: no parameter requires a gradient (check the adapter config)")
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    world_size = accelerator.num_processes
    total_steps = total_optimizer_steps(len(train_examples), cfg, world_size)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, cfg.lr_scheduler)
    )
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    objective.train()
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size
    eval_every = cfg.eval_every or max(1, total_steps // cfg.epochs if cfg.max_steps is None else total_steps)
    progress = TrainingProgress(total_steps) if show_progress and accelerator.is_main_process else NullProgress()
    result = FitResult(steps=0, best_val_loss=None, stopped_early=False)
    best_weights: dict[str, torch.Tensor] | None = None
    evals_without_improvement = 0
    started, tokens_seen = time.perf_counter(), 0

    with progress:
        for step, (epoch, window) in enumerate(optimizer_windows(len(train_examples), cfg, world_size)):
            if step >= total_steps:
                break
            my_batches = window[accelerator.process_index :: world_size]
            window_tokens = target_token_count(train_examples, [i for batch in window for i in batch])
            step_loss = 0.0
            for micro_index, indices in enumerate(my_batches):
                batch = collate_training([train_examples[i] for i in indices], pad_id)
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                # Gradients are synchronised once per optimizer step, on its last micro-batch.
                sync = micro_index == len(my_batches) - 1
                with nullcontext() if sync else accelerator.no_sync(objective):
                    out: LossOutput = objective(**batch)
                    # DDP averages gradients over processes, so scale the sum back up by world_size.
                    loss = out.loss_sum * world_size / max(1, window_tokens)
                    penalty = regularization_penalty(parameters, cfg)
                    if penalty is not None:
                        loss = loss + penalty / len(my_batches)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"training stopped at step {step + 1}: the loss is {loss.item()}")
                    accelerator.backward(loss)
                step_loss += out.loss_sum.item() / max(1, window_tokens)
                tokens_seen += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(parameters, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step + 1
            elapsed = time.perf_counter() - started
            record: dict[str, Any] = {
                "step": step + 1, "epoch": epoch, "loss": step_loss * world_size,
                "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tokens_seen * world_size / elapsed,
            }
            if val_examples and (result.steps % eval_every == 0 or result.steps == total_steps):
                metrics = evaluate_loss(objective, val_examples, eval_batch_size, pad_id, accelerator)
                record["val_loss"] = metrics["loss"]
                if result.best_val_loss is None or metrics["loss"] < result.best_val_loss:
                    result.best_val_loss = metrics["loss"]
                    evals_without_improvement = 0
                    best_weights = trainable_state(accelerator.unwrap_model(objective))
                else:
                    evals_without_improvement += 1
            progress.update(record)
            if result.steps % cfg.log_every == 0 or "val_loss" in record:
                result.history.append(record)
                if on_log is not None:
                    on_log(record)
            if cfg.early_stopping_patience and evals_without_improvement >= cfg.early_stopping_patience:
                log.info("Early stopping at step %d: no better validation loss in %d evaluations",
                         result.steps, evals_without_improvement)
                result.stopped_early = True
                break

    unwrapped = accelerator.unwrap_model(objective)
    if best_weights is not None:
        unwrapped.load_state_dict(best_weights, strict=False)
    objective.eval()
    return result


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (what early stopping restores)."""
    names = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items() if name in names}
