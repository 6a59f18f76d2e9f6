"""The Python API, with the same verbs as the CLI: train, load, predict, evaluate, export."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict, cast

import pandas as pd
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import PreTrainedModel

from tunewright.adapters import attach_adapter, count_parameters, load_adapter, optimizer_step_hook
from tunewright.checkpoint import CHECKPOINT_DIR, latest_checkpoint, load_checkpoint, run_fingerprint
from tunewright.config import TunewrightConfig, load_config
from tunewright.data import (
    Dataset,
    Splits,
    as_frame,
    build_examples,
    check_columns,
    drop_missing_targets,
    encode_prompts,
    fit_prompts,
    render_prompts,
    split_frame,
    write_table,
)
from tunewright.errors import ConfigError, DataError, RunFolderError, TrainingInterrupted, TunewrightError
from tunewright.evaluate import evaluate_frame, write_confusion_matrix, write_evaluated_rows
from tunewright.export import ExportDtype, export_model, export_run
from tunewright.gguf_export import ExportFormat, Quantization, export_gguf_format
from tunewright.heads import (
    classifier_examples,
    label_indices,
    label_texts,
    label_vocabulary,
    save_category_state,
)
from tunewright.loading import from_config, load
from tunewright.model import (
    LoadedModel,
    enable_gradient_checkpointing,
    load_base_model,
    require_quantization_support,
    resolve_device,
)
from tunewright.model_card import write_model_card
from tunewright.objective import LanguageModelObjective
from tunewright.predictor import TunedModel, attach_category, predict_rows
from tunewright.progress import log_phase, progress_wanted
from tunewright.report import write_report_quietly
from tunewright.report_data import hardware_summary, predictions_file
from tunewright.run import (
    append_log,
    check_continuable,
    resume_run,
    set_status,
    start_run,
    weights_kind,
    weights_source,
    write_json_atomic,
    write_metrics,
)
from tunewright.tracking import accelerator_options, finish_tracking, start_tracking
from tunewright.train import LogFn, fit, total_optimizer_steps
from tunewright.trust import remote_code_trusted, with_trust
from tunewright.validation_metric import generation_scorer

log = logging.getLogger(__name__)

TABLE_TYPES = (".csv", ".jsonl", ".parquet")  # what write_table writes


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class ConfusionMatrix(TypedDict):
    labels: list[str]  # the model's labels, then gold labels it never saw
    matrix: list[list[int]]  # [true][predicted] counts


class EvaluationMetrics(TypedDict, total=False):
    """What `evaluate` returns (and metrics.json holds per split): the keys depend on the output type."""

    rows: Required[int]
    loss: Required[float | None]  # category: None when no gold label is one the model knows
    # text outputs
    perplexity: float
    token_accuracy: float
    generated_token_accuracy: float
    exact_match: float
    bleu: float
    rouge_l: float
    char_error_rate: float
    # category outputs
    accuracy: float
    macro_f1: float
    expected_calibration_error: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: ConfusionMatrix
    unseen_label_rows: int


class TrainMetrics(TypedDict, total=False):
    training: Required[dict[str, Any]]  # type, steps, parameters, seconds, ...
    validation: EvaluationMetrics
    test: EvaluationMetrics


@dataclass
class TrainResult:
    """What `train` returns: the run folder, the trained model (ready to predict) and its metrics."""

    run_dir: Path
    model: TunedModel
    metrics: TrainMetrics


def _load_splits(config: TunewrightConfig, dataset: Dataset, validation: Dataset | None) -> Splits:
    frame, source = as_frame(dataset)
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


def _training_examples(tuned: TunedModel, frame: pd.DataFrame, split: str) -> list[Any]:
    started = time.perf_counter()
    examples = _tokenise(tuned, frame)
    log_phase(f"tokenised {len(examples):,} {split} rows", started)
    return examples


def _tokenise(tuned: TunedModel, frame: pd.DataFrame) -> list[Any]:
    config = tuned.config
    prompt_ids = encode_prompts(render_prompts(frame, config), tuned.tokenizer, config.prompt.use_chat_template)
    prompt_ids, kept = fit_prompts(prompt_ids, tuned.max_input_len, config.preprocessing.overlong_prompts)
    targets = [str(frame[config.output_feature.name].iloc[row]) for row in kept]
    if tuned.labels is not None:
        targets = label_texts(targets, config.output_feature.name, "dataset")
        if tuned.classifier is not None:
            return classifier_examples(prompt_ids, label_indices(targets, tuned.labels))
    return build_examples(prompt_ids, targets, tuned.tokenizer, config.preprocessing.max_target_length)


def _category_vocabulary(config: TunewrightConfig, splits: Splits) -> list[str] | None:
    """Category outputs: the label set (config or training data), checked before any model loads."""
    feature = config.output_feature
    if feature.type != "category":
        return None
    seen = [*splits.train[feature.name], *splits.validation[feature.name]]
    return label_vocabulary(feature, label_texts(seen, feature.name, "dataset"), "dataset")


def train(
    config: str | Path | dict[str, Any] | TunewrightConfig,
    dataset: Dataset,
    output_dir: str | Path,
    validation: Dataset | None = None,
    overwrite: bool = False,
    show_progress: bool | None = None,
    from_run: str | Path | None = None,
    resume: bool = False,
    trust_remote_code: bool | None = None,
    on_validation: LogFn | None = None,
) -> TrainResult:
    """Fine-tune (or, with trainer.type none, set up zero-shot) and write a complete run folder.

    With `from_run`, training continues from that run's saved adapter (or full weights) on this
    dataset instead of starting from a fresh adapter; the config must match the run's base_model
    and adapter section.

    With `resume`, an unfinished run in `output_dir` continues from its newest checkpoint and
    ends exactly as an uninterrupted run would (a different model, adapter or dataset is refused).

    Remote code: the config's backend.trust_remote_code counts for its base model, and
    `trust_remote_code` (None: TUNEWRIGHT_TRUST_REMOTE_CODE) turns it on too. Weights loaded
    from `from_run`'s folder run its code only with `trust_remote_code` (or the variable).

    Everything that can be checked without the model (config, files, columns) is checked first.
    The run folder is marked complete only after every file is written.

    `show_progress`, as in every verb: None shows bars (on stderr) when stderr is a terminal.

    `on_validation(record)`, if given, gets the log record of each evaluation during training
    (`step`, `val_loss`, `val_<metric>`, ...); an exception it raises stops the run, marked failed
    (`tunewright tune` prunes trials this way).
    """
    show_progress = progress_wanted(show_progress)
    # Not the config: it is read before anything is deleted (retraining with a run's own config.yaml works).
    sources = _source_paths({"the dataset": dataset, "the validation dataset": validation,
                             "the --from-run run": from_run})
    config = load_config(config)
    require_quantization_support(config.quantization, config.backend)
    previous_run = check_continuable(from_run, config) if from_run is not None else None
    splits = _load_splits(config, dataset, validation)
    vocabulary = _category_vocabulary(config, splits)
    run_dir = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError(f"{run_dir}: pass either --resume or --overwrite, not both")
    fingerprint = run_fingerprint(config, splits.train, splits.validation)
    accelerator = Accelerator(cpu=resolve_device(config.backend).type == "cpu",
                              **accelerator_options(config.tracking, run_dir))
    checkpoint = _open_run_folder(run_dir, config, fingerprint, accelerator, resume, overwrite, sources)
    try:
        set_seed(config.trainer.seed)  # adapter initialisation, so a rerun with the same seed is identical
        source = weights_source(config, previous_run)
        trusted = remote_code_trusted(trust_remote_code)
        if source == config.base_model:
            trusted = trusted or config.backend.trust_remote_code
        loaded = load_base_model(source, with_trust(config.backend, trusted), config.quantization,
                                 accelerator.device)
        started = time.perf_counter()
        if config.trainer.type == "none":
            tuned = TunedModel(loaded.model, loaded.tokenizer, config)
            if vocabulary is not None:
                attach_category(tuned, vocabulary)
            summary: dict[str, Any] = {"type": "none"}
            log.info("trainer.type is none: nothing is trained and no weights are saved")
        else:
            tuned, summary = _fine_tune(config, loaded, splits, vocabulary, previous_run, accelerator, run_dir,
                                        fingerprint, checkpoint, show_progress, on_validation)
        summary["seconds"] = time.perf_counter() - started
        tuned.model.eval()
        metrics = cast(TrainMetrics, {"training": summary,
                                      **_split_metrics(tuned, splits, run_dir, accelerator, show_progress)})
        finish_tracking(accelerator, dict(metrics), summary.get("steps", 0))
        if accelerator.is_main_process:
            if tuned.labels is not None:
                save_category_state(run_dir, tuned.labels, tuned.classifier.head if tuned.classifier else None)
            loaded.tokenizer.save_pretrained(run_dir)
            write_metrics(run_dir, dict(metrics))
            write_model_card(run_dir, config, dict(metrics), _data_name(dataset), {
                "train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)})
            set_status(run_dir, "complete", finished=time.time(), weights=weights_kind(run_dir),
                       hardware=hardware_summary(accelerator.device))
            write_report_quietly(run_dir)
        return TrainResult(run_dir=run_dir, model=tuned, metrics=metrics)
    except (TrainingInterrupted, KeyboardInterrupt) as error:
        finish_tracking(accelerator)
        if accelerator.is_main_process:
            set_status(run_dir, "interrupted", error=str(error) or None)
        raise
    except BaseException as error:
        finish_tracking(accelerator)
        if accelerator.is_main_process:
            set_status(run_dir, "failed", error=str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise


def _data_name(dataset: Dataset) -> str:
    """How the model card names the training data: the file's name, or the kind of object passed."""
    return f"`{Path(dataset).name}`" if isinstance(dataset, (str, Path)) else f"a {type(dataset).__name__} in memory"


def _source_paths(arguments: dict[str, Any]) -> list[tuple[str, Path]]:
    """The files and folders train() reads (those given as paths): the run folder may not hold or replace them."""
    return [(what, Path(value)) for what, value in arguments.items() if isinstance(value, (str, Path))]


def _open_run_folder(run_dir: Path, config: TunewrightConfig, fingerprint: dict[str, str],
                     accelerator: Accelerator, resume: bool, overwrite: bool,
                     sources: list[tuple[str, Path]]) -> Path | None:
    """Create (or reopen, with resume) the run folder on the main process; returns the checkpoint to resume."""
    checkpoint = None
    if accelerator.is_main_process:
        checkpoint = resume_run(run_dir, config, fingerprint) if resume else None
        if not resume:
            start_run(run_dir, config, overwrite, sources)
    # Under `accelerate launch` the other processes wait, then read what the main process checked.
    accelerator.wait_for_everyone()
    if resume and not accelerator.is_main_process:
        checkpoint = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    return checkpoint


def _fine_tune(config: TunewrightConfig, loaded: LoadedModel, splits: Splits, vocabulary: list[str] | None,
               previous_run: Path | None, accelerator: Accelerator, run_dir: Path, fingerprint: dict[str, str],
               checkpoint: Path | None, show_progress: bool, on_validation: LogFn | None = None
               ) -> tuple[TunedModel, dict[str, Any]]:
    """Wrap the model for training, run fit(), and save the trained weights into the run folder."""
    planned_steps = total_optimizer_steps(len(splits.train), config.trainer, accelerator.num_processes)
    trainable = trainable_model(loaded.model, config, planned_steps, previous_run)
    tuned = TunedModel(trainable, loaded.tokenizer, config)
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

    result = fit(
        tuned.classifier or LanguageModelObjective(tuned.model),
        _training_examples(tuned, splits.train, "training"),
        _training_examples(tuned, splits.validation, "validation") if len(splits.validation) else [],
        config.trainer,
        accelerator,
        loaded.tokenizer.pad_token_id,
        on_log=on_log,
        show_progress=show_progress,
        after_optimizer_step=optimizer_step_hook(tuned.model),
        checkpoint_dir=run_dir / CHECKPOINT_DIR,
        fingerprint=fingerprint,
        resume=load_checkpoint(checkpoint) if checkpoint is not None else None,
        score_generation=generation_scorer(tuned, splits.validation),
    )
    log_phase(f"trained {result.steps} optimizer steps", started)  # (its time includes tokenising the data)
    tuned.model = accelerator.unwrap_model(tuned.model)
    if accelerator.is_main_process:
        tuned.model.save_pretrained(run_dir, safe_serialization=True)
    summary = {"type": "finetune", "trainable_parameters": report.trainable, "total_parameters": report.total,
               "steps": result.steps, "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
               "eval_metric": config.trainer.eval_metric, "best_eval_metric": result.best_metric,
               "best_step": result.best_step}
    return tuned, summary


def _split_metrics(tuned: TunedModel, splits: Splits, run_dir: Path, accelerator: Accelerator,
                   show_progress: bool) -> dict[str, EvaluationMetrics]:
    """Metrics on the validation and test splits (and confusion-matrix pictures for categories)."""
    metrics: dict[str, Any] = {}
    for split_name in ("validation", "test"):
        frame = getattr(splits, split_name)
        if len(frame):
            evaluation = evaluate_frame(tuned, frame, show_progress, split_name)
            metrics[split_name] = evaluation.metrics
            if accelerator.is_main_process:
                write_evaluated_rows(tuned, evaluation, run_dir / predictions_file(split_name))
            if "confusion_matrix" in metrics[split_name] and accelerator.is_main_process:
                write_confusion_matrix(metrics[split_name], run_dir / f"confusion_matrix_{split_name}.png")
    return metrics


def _as_model(model: TunedModel | str | Path) -> TunedModel:
    return model if isinstance(model, TunedModel) else load(model)


def _check_output_type(path: str | Path | None, types: tuple[str, ...]) -> None:
    """Before any model loads or row is predicted: a wrong file type would otherwise fail only at the end."""
    if path is not None and Path(path).suffix.lower() not in types:
        raise DataError(f"{path}: unknown output type '{Path(path).suffix}'; use {' or '.join(types)}")


def predict(model: TunedModel | str | Path, dataset: Dataset, output: str | Path | None = None,
            show_progress: bool | None = None, all_probabilities: bool = False) -> pd.DataFrame:
    """Predict for every row; returns (and optionally writes) the rows plus a `prediction` column.

    Category outputs add `prediction_probability`, and with `all_probabilities` a
    `probability_<label>` column per label. `show_progress` None: bars when stderr is a terminal.
    """
    _check_output_type(output, TABLE_TYPES)
    predictions = predict_rows(_as_model(model), dataset, progress_wanted(show_progress), all_probabilities)
    if output is not None:
        write_table(predictions, output)
    return predictions


def evaluate(model: TunedModel | str | Path, dataset: Dataset, output: str | Path | None = None,
             predictions_output: str | Path | None = None,
             show_progress: bool | None = None) -> EvaluationMetrics:
    """Metrics on a labelled dataset; optionally writes them as JSON (and the predictions).

    Text outputs get flat float metrics; category outputs add `per_class` and `confusion_matrix`
    (nested, see `EvaluationMetrics`). Counts (`rows`, `support`, matrix cells) are ints.
    `show_progress` None: bars when stderr is a terminal.
    """
    _check_output_type(output, (".json",))
    _check_output_type(predictions_output, TABLE_TYPES)
    tuned = _as_model(model)
    frame, source = as_frame(dataset)
    evaluation = evaluate_frame(tuned, frame, progress_wanted(show_progress), source)
    if output is not None:
        write_json_atomic(Path(output), evaluation.metrics)
        if "confusion_matrix" in evaluation.metrics:
            write_confusion_matrix(evaluation.metrics, Path(output).with_suffix(".png"))
    if predictions_output is not None:
        write_table(evaluation.predictions, predictions_output)
    metrics: EvaluationMetrics = evaluation.metrics  # type: ignore[assignment]
    return metrics


def export(model: TunedModel | str | Path, output_dir: str | Path, merge: bool = False,
           dtype: ExportDtype | None = None, overwrite: bool = False,
           trust_remote_code: bool | None = None, format: ExportFormat = "hf",
           quantization: Quantization | None = None) -> Path:
    """Export a loaded model or a run folder: a plain Hugging Face model folder, or the adapter alone;
    or, with `format` "gguf" / "ollama", one GGUF file for llama.cpp (and an Ollama Modelfile).

    Args:
        model: a `TunedModel` (`load`, `from_config`, `train(...).model`) or a run folder. Merging
            changes a loaded model's weights in place: load it again to keep using it unmerged.
        output_dir: the folder to write (under a temporary name, renamed when complete).
        merge: merge the adapter into the base weights (else write the adapter folder alone).
        dtype: cast the weights to "float32", "bfloat16" or "float16" (default: keep the run's dtype).
        overwrite: replace an existing export folder.
        trust_remote_code: a run folder only: let the model's own code run (None:
            TUNEWRIGHT_TRUST_REMOTE_CODE). A loaded model was trusted, or not, when it was loaded.
        format: "hf" (a Hugging Face folder), "gguf" or "ollama" (always merged; returns the .gguf path).
        quantization: the GGUF tensor type, "f32", "f16" (the default), "bf16" or "q8_0".

    Raises:
        ConfigError: the run cannot be exported as asked (prompt-learning merge, classifier head).
        RunFolderError: the run folder is incomplete, or the output folder exists and `overwrite` is false.
    """
    if format != "hf":
        return export_gguf_format(model, output_dir, format, quantization, dtype, overwrite, trust_remote_code)
    if quantization is not None:
        raise ConfigError("export --quantization: applies to --format gguf or ollama; use --dtype for a "
                          "Hugging Face folder")
    if isinstance(model, TunedModel):
        return export_model(model, output_dir, merge, dtype, overwrite)
    return export_run(model, output_dir, merge, dtype, overwrite, trust_remote_code)


__all__ = ["EvaluationMetrics", "TrainMetrics", "TrainResult", "TunewrightError", "as_frame", "evaluate",
           "export", "from_config", "load", "predict", "train"]


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
