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

from tunewright.chat_templates import set_run_template
from tunewright.checkpoint import CHECKPOINT_DIR, latest_checkpoint, run_fingerprint
from tunewright.config import TunewrightConfig, load_config
from tunewright.data import (
    Dataset,
    as_frame,
    calibration_sample,
    few_shot_pool,
    resolve_calibration,
    write_table,
)
from tunewright.errors import ConfigError, DataError, RunFolderError, TrainingInterrupted, TunewrightError
from tunewright.evaluate import evaluate_frame, write_confusion_matrix
from tunewright.export import ExportDtype, export_model, export_run
from tunewright.few_shot import save_index
from tunewright.fine_tune import category_vocabulary, fine_tune, load_splits, split_metrics
from tunewright.gguf_export import ExportFormat, Quantization, export_gguf_format
from tunewright.heads import (
    save_category_state,
    save_label_prior,
)
from tunewright.loading import from_config, load
from tunewright.model import (
    load_base_model,
    require_quantization_support,
    resolve_device,
)
from tunewright.model_card import write_model_card
from tunewright.predictor import TunedModel, attach_category, predict_rows
from tunewright.preference_training import (
    continue_reference,
    is_preference,
    preference_fingerprint,
)
from tunewright.progress import progress_wanted
from tunewright.report import write_report_quietly
from tunewright.report_data import hardware_summary
from tunewright.run import (
    check_continuable,
    resume_run,
    set_status,
    start_run,
    weights_kind,
    weights_source,
    write_json_atomic,
    write_metrics,
)
from tunewright.tracking import accelerator_options, finish_tracking
from tunewright.train import LogFn
from tunewright.trust import remote_code_trusted, with_trust

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
    config = continue_reference(config, previous_run)
    splits = load_splits(config, dataset, validation)
    config = resolve_calibration(config, splits.train)
    vocabulary = category_vocabulary(config, splits)
    few_shot = few_shot_pool(splits.train, config)
    calibration_inputs = calibration_sample(splits.train, config)
    run_dir = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError(f"{run_dir}: pass either --resume or --overwrite, not both")
    fingerprint = run_fingerprint(config, splits.train, splits.validation)
    if is_preference(config):
        fingerprint.update(preference_fingerprint(config, splits))
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
        set_run_template(config, loaded.tokenizer)  # saved with the tokenizer: every later step renders with it
        started = time.perf_counter()
        if config.trainer.type == "none":
            tuned = TunedModel(loaded.model, loaded.tokenizer, config, few_shot=few_shot,
                               calibration_inputs=calibration_inputs)
            if vocabulary is not None:
                attach_category(tuned, vocabulary)
            summary: dict[str, Any] = {"type": "none"}
            log.info("trainer.type is none: nothing is trained and no weights are saved")
        else:
            tuned, summary = fine_tune(config, loaded, splits, vocabulary, previous_run, accelerator, run_dir,
                                        fingerprint, checkpoint, show_progress, on_validation, few_shot,
                                        calibration_inputs)
        summary["seconds"] = time.perf_counter() - started
        tuned.model.eval()
        tuned.label_prior = None  # calibration: rows: estimated again with the weights training kept
        metrics = cast(TrainMetrics, {"training": summary,
                                      **split_metrics(tuned, splits, run_dir, accelerator, show_progress)})
        finish_tracking(accelerator, dict(metrics), summary.get("steps", 0))
        if accelerator.is_main_process:
            if tuned.labels is not None:
                save_category_state(run_dir, tuned.labels, tuned.classifier.head if tuned.classifier else None)
                if tuned.calibration_inputs is not None and tuned.classifier is None:
                    save_label_prior(run_dir, tuned.rows_log_prior())
            loaded.tokenizer.save_pretrained(run_dir)
            if tuned.few_shot is not None:
                save_index(tuned.few_shot, run_dir)
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
