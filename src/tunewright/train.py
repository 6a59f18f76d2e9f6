"""fit(): a readable training loop on Accelerate (so `accelerate launch` scales it unchanged)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import get_scheduler

from tunewright.checkpoint import (
    Checkpoint,
    TrainerState,
    capture_rng_state,
    checkpoint_name,
    restore_rng_state,
    save_checkpoint,
)
from tunewright.config import TrainerConfig
from tunewright.data import IGNORE_INDEX, Example
from tunewright.errors import RunFolderError, TrainingError
from tunewright.faults import StopNow, StopRequest, interruption, is_out_of_memory, skip_nonfinite_step, step_is_finite
from tunewright.kernels.gpu_training import optimizer_options
from tunewright.kernels.training import training_kernels
from tunewright.objective import LossOutput
from tunewright.packing import collate_micro_batch, group_by_length, supports_packing
from tunewright.progress import NullProgress, TrainingProgress
from tunewright.selection import GenerationScorer, adopt_selection_state, check_scorer, trainable_state, validate
from tunewright.time_budget import PROVISIONAL_STEPS, StepBudget
from tunewright.tracking import log_record, peak_memory_mib

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    steps: int
    best_val_loss: float | None  # the lowest validation loss seen
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps skipped (on_nonfinite: skip_batch)
    checkpoint: Path | None = None  # the newest checkpoint written or resumed from
    best_metric: float | None = None  # the best trainer.eval_metric seen: the kept weights are that step's
    best_step: int | None = None
    time_budget: dict[str, float] | None = None  # the step count trainer.time_budget chose, and its measures


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def learning_rate_schedule(optimizer: Any, cfg: TrainerConfig, total_steps: int, steps_done: int = 0) -> Any:
    """transformers' schedule named by `cfg.lr_scheduler`, stepped once per optimizer step (and already
    `steps_done` times: a schedule rebuilt mid-run over a new length)."""
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    name, kwargs = cfg.lr_scheduler, dict(cfg.lr_scheduler_kwargs)
    if name == "constant":
        name = "constant_with_warmup"  # transformers' `constant` ignores warmup
    if name == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, round(0.1 * total_steps)))
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=kwargs)
    for _ in range(steps_done):
        scheduler.step()
    return scheduler


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of example indices; a pure function of (seed, epoch) so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]


def optimizer_windows(num_examples: int, cfg: TrainerConfig, world_size: int,
                      lengths: Sequence[int] | None = None) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (epoch, micro-batches of one optimizer step across all processes), forever over epochs.

    With `lengths` and trainer.group_by_length (and no packing), batches hold samples of similar length.
    """
    per_step = cfg.gradient_accumulation_steps * world_size
    epoch = 0
    while True:
        batches = epoch_batches(num_examples, cfg.batch_size, cfg.seed, epoch)
        if lengths is not None and cfg.group_by_length and not cfg.packing:
            batches = group_by_length(batches, lengths, cfg.seed, epoch)
        for start in range(0, len(batches), per_step):
            yield epoch, batches[start : start + per_step]
        epoch += 1


def total_optimizer_steps(num_examples: int, cfg: TrainerConfig, world_size: int) -> int:
    """The run's step count; with trainer.time_budget, the provisional one until the first steps are timed."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.time_budget is not None:
        return PROVISIONAL_STEPS
    batches = math.ceil(num_examples / cfg.batch_size)
    return math.ceil(batches / (cfg.gradient_accumulation_steps * world_size)) * cfg.epochs


def scheduled_eval_every(cfg: TrainerConfig, total_steps: int) -> int:
    """Validate every trainer.eval_every steps; by default at each epoch's end, or only at the end of a run
    whose length is max_steps or a time budget."""
    if cfg.eval_every is not None:
        return cfg.eval_every
    if cfg.max_steps is None and cfg.time_budget is None:
        return max(1, total_steps // cfg.epochs)
    return max(1, total_steps)


def settle_time_budget(budget: StepBudget, ctx: StepContext, session: Session, record: dict[str, Any],
                       val_examples: Sequence[Example], scorer: GenerationScorer | None) -> int:
    """trainer.time_budget, after the timed steps: one timed validation (when there are validation rows),
    then the total step count, kept in the state, and the schedule rebuilt over it. Returns the total."""
    validation_seconds = 0.0
    if val_examples:
        started = budget.clock()
        validate(ctx, session, record, val_examples, scorer)
        validation_seconds = budget.clock() - started
    decision = budget.choose(session.state.step, validation_seconds, ctx.cfg.eval_every)
    return adopt_time_budget(decision, ctx, session, record)


def recheck_time_budget(budget: StepBudget, ctx: StepContext, session: Session, record: dict[str, Any]) -> int:
    """trainer.time_budget, every tenth of the run: the count again at the recent pace. Returns the total."""
    assert session.state.time_budget is not None
    decision = budget.check(session.state.step, session.state.time_budget, ctx.cfg.eval_every)
    return adopt_time_budget(decision, ctx, session, record)


def adopt_time_budget(decision: dict[str, float], ctx: StepContext, session: Session, record: dict[str, Any]) -> int:
    """Train to the decision's count: kept in the state (and so in checkpoints), the schedule rebuilt over it."""
    if ctx.accelerator.num_processes > 1:  # every process trains to the main process's count
        decision = broadcast_object_list([decision])[0]
    unchanged = session.state.time_budget is not None and decision["steps"] == session.state.time_budget["steps"]
    session.state.time_budget = decision
    total_steps = int(decision["steps"])
    if not unchanged:
        session.scheduler = learning_rate_schedule(session.scheduler.optimizer, ctx.cfg, total_steps,
                                                   session.state.step)
        record["learning_rate"] = session.scheduler.get_last_lr()[0]
    return total_steps


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


@dataclass
class StepContext:
    """What every optimizer step needs, bundled so that the step helpers stay small."""

    objective: nn.Module
    optimizer: Any
    parameters: list[nn.Parameter]
    examples: Sequence[Example]
    lengths: list[int]
    cfg: TrainerConfig
    accelerator: Accelerator
    pad_id: int
    packing: bool
    row_capacity: int | None  # tokens per packed row (None: one row per micro-batch)
    autocast: Any
    stop: StopRequest
    batching: Batching | None = None  # None: language-model examples (data.Example)


@dataclass
class Batching:
    """How fit() handles examples other than data.Example (preference pairs: preference_objective.py)."""

    collate: Callable[[Sequence[Any], int], dict[str, torch.Tensor]]  # (examples, pad_id) -> batch
    # Called as each optimizer step (or its retry) starts: the loss normaliser of its window.
    begin_window: Callable[[Sequence[Any], Sequence[int]], int]
    step_metrics: Callable[[], dict[str, float]]  # extra figures for the step's log record
    evaluate: Callable[[nn.Module, Sequence[Any], int, int, Accelerator], dict[str, float]]  # validation


def split_micro_batches(batches: Sequence[list[int]], size: int, lengths: Sequence[int] | None = None,
                        token_budget: int | None = None) -> list[list[int]]:
    """Cut each batch into micro-batches of at most `size` samples and, with a budget, at most
    `token_budget` tokens (a longer sample goes alone); the order of samples is kept."""
    micro_batches: list[list[int]] = []
    for batch in batches:
        current: list[int] = []
        tokens = 0
        for index in batch:
            length = lengths[index] if lengths is not None and token_budget is not None else 0
            if current and (len(current) == size or (token_budget is not None and tokens + length > token_budget)):
                micro_batches.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += length
        if current:
            micro_batches.append(current)
    return micro_batches


def accumulate_window(ctx: StepContext, window: Sequence[list[int]], micro_size: int) -> tuple[float, int]:
    """Forward and backward every micro-batch of one optimizer step; returns (loss, real tokens)."""
    accelerator, world_size = ctx.accelerator, ctx.accelerator.num_processes
    micro_batches = split_micro_batches(window[accelerator.process_index :: world_size], micro_size, ctx.lengths,
                                        ctx.cfg.batch_tokens)
    normaliser = ctx.batching.begin_window if ctx.batching is not None else target_token_count
    window_tokens = max(1, normaliser(ctx.examples, [i for batch in window for i in batch]))
    step_loss, tokens = 0.0, 0
    for micro_index, indices in enumerate(micro_batches):
        if world_size == 1 and ctx.stop.signal_number is not None:
            raise StopNow
        if ctx.batching is not None:
            batch = ctx.batching.collate([ctx.examples[i] for i in indices], ctx.pad_id)
        else:
            batch = collate_micro_batch([ctx.examples[i] for i in indices], ctx.pad_id, ctx.packing,
                                        ctx.row_capacity)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        # Gradients are synchronised once per optimizer step, on its last micro-batch.
        sync = micro_index == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(ctx.objective):
            with ctx.autocast:
                out: LossOutput = ctx.objective(**batch)
            # DDP averages gradients over processes, so scale the sum back up by world_size.
            loss = out.loss_sum * world_size / window_tokens
            penalty = regularization_penalty(ctx.parameters, ctx.cfg)
            if penalty is not None:
                loss = loss + penalty / len(micro_batches)
            accelerator.backward(loss)
        step_loss += out.loss_sum.item() / window_tokens
        tokens += sum(ctx.lengths[i] for i in indices)  # real tokens, padding excluded
    return step_loss * world_size, tokens


def window_with_retry(ctx: StepContext, step: int, window: Sequence[list[int]], micro_size: int,
                      rng: dict[str, Any]) -> tuple[float, int, int]:
    """One optimizer step; on out-of-memory (if enabled) halve the micro-batch and redo the whole step.

    Halving keeps the samples of the step and the token normalisation, so the loss is the same;
    only the number of micro-batches (gradient accumulation) grows. Returns (loss, tokens, micro size).
    """
    while True:
        try:
            step_loss, tokens = accumulate_window(ctx, window, micro_size)
            return step_loss, tokens, micro_size
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        # Outside the except block, so the traceback and the tensors it holds are released first.
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        where = f"out of memory at optimizer step {step + 1} with a micro-batch of {micro_size}"
        if not ctx.cfg.halve_batch_on_oom:
            raise TrainingError(f"{where}; set trainer.halve_batch_on_oom: true, or lower trainer.batch_size "
                                "and raise trainer.gradient_accumulation_steps (same effective batch)")
        if ctx.accelerator.num_processes > 1:
            raise TrainingError(f"{where}; halve_batch_on_oom needs a single process: lower trainer.batch_size")
        if micro_size == 1:
            raise TrainingError(f"{where}; shorten the inputs (preprocessing.max_input_length) or set "
                                "trainer.gradient_checkpointing: true")
        restore_rng_state(rng)  # the retried step draws the same dropout masks as a first try would
        micro_size = (micro_size + 1) // 2
        log.warning("%s: retrying with micro-batches of %d (same effective batch)", where, micro_size)


def save_training_checkpoint(directory: Path, state: TrainerState, ctx: StepContext, scheduler: Any,
                             best_weights: dict[str, torch.Tensor] | None) -> Path:
    """Checkpoint at an optimizer-step boundary (main process writes; all wait for it)."""
    accelerator = ctx.accelerator
    if accelerator.is_main_process:
        training_state = {"optimizer": ctx.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "rng": capture_rng_state()}
        weights = trainable_state(accelerator.unwrap_model(ctx.objective))
        save_checkpoint(directory, state, weights, best_weights, training_state, ctx.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return directory / checkpoint_name(state.step)


def restore_checkpoint(objective: nn.Module, optimizer: Any, scheduler: Any, checkpoint: Checkpoint) -> None:
    """Weights, optimizer and scheduler from a checkpoint (before accelerator.prepare wraps them)."""
    expected = {name for name, parameter in objective.named_parameters() if parameter.requires_grad}
    saved = set(checkpoint.weights)
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise RunFolderError(
            f"{checkpoint.path}: its weights do not match the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, e.g. {example}); resume with the base model and adapter it was made with"
        )
    objective.load_state_dict(checkpoint.weights, strict=False)
    optimizer.load_state_dict(checkpoint.training_state["optimizer"])
    scheduler.load_state_dict(checkpoint.training_state["scheduler"])


@dataclass
class Session:
    """A run's state across optimizer steps: what is saved in checkpoints and reported per step."""

    state: TrainerState
    scheduler: Any
    best_weights: dict[str, torch.Tensor] | None
    checkpoint: Path | None
    checkpoint_dir: Path | None
    started: float = field(default_factory=time.perf_counter)
    tokens_seen: int = 0

    def save(self, ctx: StepContext) -> Path | None:
        if self.checkpoint_dir is not None:
            self.checkpoint = save_training_checkpoint(self.checkpoint_dir, self.state, ctx, self.scheduler,
                                                       self.best_weights)
        return self.checkpoint


def start_session(objective: nn.Module, optimizer: Any, cfg: TrainerConfig, total_steps: int,
                  fingerprint: dict[str, str] | None, resume: Checkpoint | None, checkpoint_dir: Path | None
                  ) -> Session:
    """A new session, or the one `resume` saved (weights, optimizer and scheduler restored)."""
    scheduler = learning_rate_schedule(optimizer, cfg, total_steps)
    if resume is None:
        state = TrainerState(fingerprint=fingerprint or {})
        state.micro_batch_size = cfg.batch_size
        adopt_selection_state(state, cfg, None)
        return Session(state, scheduler, None, None, checkpoint_dir)
    adopt_selection_state(resume.state, cfg, resume.path)
    restore_checkpoint(objective, optimizer, scheduler, resume)
    resume.state.micro_batch_size = resume.state.micro_batch_size or cfg.batch_size
    log.info("Resuming from %s (optimizer step %d of %d)", resume.path, resume.state.step, total_steps)
    return Session(resume.state, scheduler, resume.best_weights, resume.path, checkpoint_dir)


def gradient_norm(ctx: StepContext, max_norm: float | None) -> float:
    """The gradients' total norm before clipping; clipped to `max_norm` when one is set."""
    if max_norm is not None:
        return float(ctx.accelerator.clip_grad_norm_(ctx.parameters, max_norm))
    gradients = [parameter.grad for parameter in ctx.parameters if parameter.grad is not None]
    return float(torch.nn.utils.get_total_norm(gradients)) if gradients else 0.0


def finish_step(ctx: StepContext, session: Session, step: int, epoch: int, step_loss: float,
                after_optimizer_step: Callable[[int, int], None] | None, total_steps: int) -> dict[str, Any]:
    """Apply (or skip, if non-finite) the accumulated gradients; returns the step's log record."""
    state, cfg = session.state, ctx.cfg
    grad_norm = None
    if step_is_finite(step_loss, ctx.parameters, ctx.accelerator):
        grad_norm = gradient_norm(ctx, cfg.max_grad_norm)
        ctx.optimizer.step()
        if after_optimizer_step is not None:
            after_optimizer_step(step + 1, total_steps)
    else:
        skip_nonfinite_step(state, step + 1, epoch, step_loss, cfg, session.checkpoint)
    session.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    state.step = step + 1
    skipped = state.step in state.skipped_steps
    elapsed = time.perf_counter() - session.started
    record: dict[str, Any] = {
        "step": state.step, "epoch": epoch, "loss": None if skipped else step_loss,
        "learning_rate": session.scheduler.get_last_lr()[0],
        "tokens_per_s": session.tokens_seen * ctx.accelerator.num_processes / elapsed,
        "peak_memory_mib": peak_memory_mib(ctx.accelerator.device),
    }
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if skipped:
        record["skipped"] = True
    if state.micro_batch_size != cfg.batch_size:
        record["micro_batch_size"] = state.micro_batch_size
    return record


def fit(
    objective: nn.Module,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: TrainerConfig,
    accelerator: Accelerator,
    pad_id: int,
    on_log: LogFn | None = None,
    show_progress: bool = True,
    after_optimizer_step: Callable[[int, int], None] | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: dict[str, str] | None = None,
    resume: Checkpoint | None = None,
    score_generation: GenerationScorer | None = None,
    batching: Batching | None = None,
) -> FitResult:
    """Train the trainable parameters of `objective` and keep the best weights by trainer.eval_metric.

    `after_optimizer_step(steps_done, total_steps)`, if given, runs after each optimizer step and
    before the gradients are cleared (AdaLoRA re-allocates its ranks there; see adapters.py).
    `batching`, for examples other than data.Example, replaces collation, the loss normaliser and
    validation, and adds figures to each step's record (see `Batching`).
    `score_generation()`, needed for a generated trainer.eval_metric, returns the generated metrics
    of the validation rows with the weights of the moment (validation_metric.py); see selection.py.

    The loss of every optimizer step is the sum over its target tokens divided by the number of
    target tokens in the whole accumulation window (on every process), so accumulation and
    padding never change its value.

    With `checkpoint_dir`, checkpoints are saved every trainer.checkpoint_steps and on SIGTERM or
    Ctrl-C (then TrainingInterrupted is raised). With `resume`, training continues from that
    checkpoint and reproduces the uninterrupted run exactly: the batch order is a pure function of
    (seed, epoch), so skipping the first `step` optimizer windows restores the data position.

    Raises:
        TrainingError: a non-finite loss or gradient (on_nonfinite: stop), or out of memory.
        TrainingInterrupted: SIGTERM or Ctrl-C; a checkpoint was saved first.
    """
    torch.manual_seed(cfg.seed)
    parameters = trainable_parameters(objective)
    if not parameters:
        raise TrainingError("nothing to train: no parameter requires a gradient (check the adapter config)")
    check_scorer(cfg, bool(val_examples), score_generation)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.peak_learning_rate, weight_decay=cfg.weight_decay,
                                  **optimizer_options(accelerator.device))
    world_size = accelerator.num_processes
    total_steps = total_optimizer_steps(len(train_examples), cfg, world_size)
    if resume is not None and resume.state.time_budget is not None and cfg.time_budget is not None:
        total_steps = int(resume.state.time_budget["steps"])  # chosen before the interruption: kept
    session = start_session(objective, optimizer, cfg, total_steps, fingerprint, resume, checkpoint_dir)
    state = session.state
    budget = StepBudget(cfg.time_budget) if cfg.time_budget is not None and not state.time_budget else None
    unwrapped, packing = objective, cfg.packing and supports_packing(objective)
    # The scheduler stays unprepared: Accelerate's wrapper steps it once per process, and our
    # step count is already per optimizer step across all processes.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    if resume is not None:
        restore_rng_state(resume.training_state["rng"])
    objective.train()
    eval_every = scheduled_eval_every(cfg, total_steps)
    progress = TrainingProgress(total_steps) if show_progress and accelerator.is_main_process else NullProgress()
    lengths = [len(example.input_ids) for example in train_examples]
    stop = StopRequest()
    speed_paths = training_kernels(unwrapped, cfg.precision, accelerator.device, packing, compile_layers=cfg.compile,
                                   offload_activations=cfg.gradient_checkpointing == "offload")
    with progress, stop, speed_paths as kernels:
        ctx = StepContext(objective, optimizer, parameters, train_examples, lengths, cfg, accelerator, pad_id,
                          packing, kernels.row_capacity, kernels.autocast, stop, batching)
        progress.update(None, advance=state.step)
        for step, (epoch, window) in enumerate(optimizer_windows(len(train_examples), cfg, world_size, lengths)):
            if step < state.step:
                continue  # trained before the checkpoint this run resumed from
            if step >= total_steps or state.stopped_early:
                break
            if stop.requested(accelerator):
                raise interruption(stop, state.step, session.save(ctx))
            rng = capture_rng_state()
            if budget is not None:
                budget.step_starts()
            try:
                step_loss, tokens, state.micro_batch_size = window_with_retry(
                    ctx, step, window, state.micro_batch_size, rng)
            except StopNow:
                # Drop the unfinished window; restoring the RNG makes the resumed run draw the same numbers.
                optimizer.zero_grad(set_to_none=True)
                restore_rng_state(rng)
                raise interruption(stop, state.step, session.save(ctx)) from None
            session.tokens_seen += tokens
            record = finish_step(ctx, session, step, epoch, step_loss, after_optimizer_step, total_steps)
            if batching is not None:
                record.update(batching.step_metrics())
            validated = False
            if budget is not None and budget.step_done():
                total_steps = settle_time_budget(budget, ctx, session, record, val_examples, score_generation)
                eval_every, validated = scheduled_eval_every(cfg, total_steps), bool(val_examples)
                progress.set_total(total_steps)
            elif budget is not None and budget.check_due(state.step, total_steps):
                total_steps = recheck_time_budget(budget, ctx, session, record)
                eval_every = scheduled_eval_every(cfg, total_steps)
                progress.set_total(total_steps)
            if val_examples and not validated and (state.step % eval_every == 0 or state.step == total_steps):
                started = budget.clock() if budget is not None else 0.0
                validate(ctx, session, record, val_examples, score_generation)
                if budget is not None:
                    budget.validated(budget.clock() - started)
            progress.update(None if record.get("skipped") else record)
            if state.step % cfg.log_every == 0 or "val_loss" in record:
                state.history.append(record)
                if on_log is not None:
                    on_log(record)
                log_record(accelerator, record)
            if cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0:
                session.save(ctx)
        if stop.requested(accelerator):
            raise interruption(stop, state.step, session.save(ctx))
    if session.best_weights is not None:
        accelerator.unwrap_model(objective).load_state_dict(session.best_weights, strict=False)
    objective.eval()
    return FitResult(steps=state.step, best_val_loss=state.best_val_loss, stopped_early=state.stopped_early,
                     history=state.history, skipped_steps=state.skipped_steps, checkpoint=session.checkpoint,
                     best_metric=state.best_metric, best_step=state.best_step, time_budget=state.time_budget)

