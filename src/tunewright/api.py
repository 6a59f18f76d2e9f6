"""The Python API, with the same verbs as the CLI: train, load, predict, evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import Accelerator

from tunewright.adapters import attach_adapter, count_parameters, load_adapter
from tunewright.config import TunewrightConfig, load_config
from tunewright.data import (
    Splits,
    build_examples,
    check_columns,
    drop_null_rows,
    encode_prompts,
    fit_prompts,
    read_table,
    render_prompts,
    split_frame,
)
from tunewright.errors import DataError, TunewrightError
from tunewright.evaluate import evaluate_frame
from tunewright.model import load_base_model, load_tokenizer, resolve_device
from tunewright.objective import LanguageModelObjective
from tunewright.predictor import TunedModel
from tunewright.run import (
    append_log,
    check_complete,
    load_run_config,
    set_status,
    start_run,
    weights_kind,
    write_json_atomic,
    write_metrics,
)
from tunewright.train import fit

log = logging.getLogger(__name__)

Dataset = str | Path | pd.DataFrame | list[dict[str, Any]]


@dataclass
class TrainResult:
    run_dir: Path
    model: TunedModel
    metrics: dict[str, Any]


def as_frame(dataset: Dataset, name: str = "dataset") -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a file path, a DataFrame or a list of row dicts."""
    if isinstance(dataset, pd.DataFrame):
        frame, source = dataset, name
    elif isinstance(dataset, list):
        frame, source = pd.DataFrame(dataset), name
    else:
        return read_table(dataset), str(dataset)
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    return frame, source


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write predictions as CSV, JSONL or Parquet, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        raise DataError(f"{path}: unknown output type '{suffix}'; use .csv, .jsonl or .parquet")


def _load_splits(config: TunewrightConfig, dataset: Dataset, validation: Dataset | None) -> Splits:
    frame, source = as_frame(dataset)
    needed = [*config.input_columns, config.output_feature.name]
    check_columns(frame, needed, source)
    frame = drop_null_rows(frame, needed, source)
    if validation is None:
        splits = split_frame(frame, config.preprocessing, config.trainer.seed)
    else:
        validation_frame, validation_source = as_frame(validation, "validation dataset")
        check_columns(validation_frame, needed, validation_source)
        validation_frame = drop_null_rows(validation_frame, needed, validation_source)
        splits = Splits(frame, validation_frame, frame.iloc[0:0])
    if len(splits.train) == 0 and config.trainer.type == "finetune":
        raise DataError(f"{source}: the training split is empty; add rows or change preprocessing.split")
    return splits


def _training_examples(tuned: TunedModel, frame: pd.DataFrame) -> list[Any]:
    config = tuned.config
    prompt_ids = encode_prompts(render_prompts(frame, config), tuned.tokenizer, config.prompt.use_chat_template)
    prompt_ids, kept = fit_prompts(prompt_ids, tuned.max_input_len, config.preprocessing.overlong_prompts)
    targets = [str(frame[config.output_feature.name].iloc[row]) for row in kept]
    return build_examples(prompt_ids, targets, tuned.tokenizer, config.preprocessing.max_target_length)


def train(
    config: str | Path | dict[str, Any] | TunewrightConfig,
    dataset: Dataset,
    output_dir: str | Path,
    validation: Dataset | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune (or, with trainer.type none, set up zero-shot) and write a complete run folder.

    Everything that can be checked without the model (config, files, columns) is checked first.
    The run folder is marked complete only after every file is written.
    """
    config = load_config(config)
    splits = _load_splits(config, dataset, validation)
    run_dir = Path(output_dir)
    start_run(run_dir, config, overwrite)
    try:
        accelerator = Accelerator(cpu=resolve_device(config.backend).type == "cpu")
        loaded = load_base_model(config.base_model, config.backend, config.quantization, accelerator.device)
        started = time.perf_counter()
        summary: dict[str, Any] = {"type": config.trainer.type}
        if config.trainer.type == "none":
            tuned = TunedModel(loaded.model, loaded.tokenizer, config)
            log.info("trainer.type is none: nothing is trained and no weights are saved")
        else:
            tuned = TunedModel(attach_adapter(loaded.model, config.adapter), loaded.tokenizer, config)
            report = count_parameters(tuned.model)
            summary.update(trainable_parameters=report.trainable, total_parameters=report.total)
            result = fit(
                LanguageModelObjective(tuned.model),
                _training_examples(tuned, splits.train),
                _training_examples(tuned, splits.validation) if len(splits.validation) else [],
                config.trainer,
                accelerator,
                loaded.tokenizer.pad_token_id,
                on_log=lambda record: append_log(run_dir, record) if accelerator.is_main_process else None,
                show_progress=show_progress,
            )
            summary.update(steps=result.steps, best_val_loss=result.best_val_loss, stopped_early=result.stopped_early)
            tuned.model = accelerator.unwrap_model(tuned.model)
            if accelerator.is_main_process:
                tuned.model.save_pretrained(run_dir, safe_serialization=True)
        summary["seconds"] = time.perf_counter() - started
        tuned.model.eval()
        metrics: dict[str, Any] = {"training": summary}
        for split_name in ("validation", "test"):
            frame = getattr(splits, split_name)
            if len(frame):
                metrics[split_name] = evaluate_frame(tuned, frame, show_progress, split_name).metrics
        if accelerator.is_main_process:
            loaded.tokenizer.save_pretrained(run_dir)
            write_metrics(run_dir, metrics)
            set_status(run_dir, "complete", finished=time.time(), weights=weights_kind(run_dir))
        return TrainResult(run_dir=run_dir, model=tuned, metrics=metrics)
    except KeyboardInterrupt:
        set_status(run_dir, "interrupted")
        raise
    except BaseException as error:
        set_status(run_dir, "failed", error=str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise


def from_config(config: str | Path | dict[str, Any] | TunewrightConfig) -> TunedModel:
    """A zero-shot model straight from a config (no run folder): the base model as configured."""
    config = load_config(config)
    loaded = load_base_model(config.base_model, config.backend, config.quantization)
    loaded.model.eval()
    return TunedModel(loaded.model, loaded.tokenizer, config)


def load(run_dir: str | Path) -> TunedModel:
    """Load a complete run folder: base model + saved adapter, or the saved full weights."""
    run_dir = check_complete(run_dir)
    config = load_run_config(run_dir)
    kind = weights_kind(run_dir)
    if kind == "full":
        loaded = load_base_model(str(run_dir), config.backend)
    else:
        loaded = load_base_model(config.base_model, config.backend, config.quantization)
        loaded.tokenizer = load_tokenizer(str(run_dir), config.backend.trust_remote_code)
    model = load_adapter(loaded.model, str(run_dir)) if kind == "adapter" else loaded.model
    model.eval()
    return TunedModel(model, loaded.tokenizer, config)


def _as_model(model: TunedModel | str | Path) -> TunedModel:
    return model if isinstance(model, TunedModel) else load(model)


def predict(model: TunedModel | str | Path, dataset: Dataset, output: str | Path | None = None,
            show_progress: bool = False) -> pd.DataFrame:
    """Predict for every row; returns (and optionally writes) the rows plus a `prediction` column."""
    tuned = _as_model(model)
    frame, source = as_frame(dataset)
    check_columns(frame, tuned.config.input_columns, source)
    predictions = tuned.predict(frame, show_progress)
    if output is not None:
        write_table(predictions, output)
    return predictions


def evaluate(model: TunedModel | str | Path, dataset: Dataset, output: str | Path | None = None,
             predictions_output: str | Path | None = None, show_progress: bool = False) -> dict[str, float]:
    """Metrics on a labelled dataset; optionally writes them as JSON (and the predictions)."""
    tuned = _as_model(model)
    frame, source = as_frame(dataset)
    evaluation = evaluate_frame(tuned, frame, show_progress, source)
    if output is not None:
        write_json_atomic(Path(output), evaluation.metrics)
    if predictions_output is not None:
        write_table(evaluation.predictions, predictions_output)
    return evaluation.metrics


__all__ = ["TrainResult", "TunewrightError", "as_frame", "evaluate", "from_config", "load", "predict", "train"]
