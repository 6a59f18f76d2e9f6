"""Experiment tracking (the `tracking:` section) through Accelerate's trackers.

The Accelerator is built with the trackers asked for (`accelerator_options`), which are started once
the run folder exists (`start_tracking`: the resolved config, the parameter counts and the hardware,
logged once). fit() logs every training-log record (`log_record`); `finish_tracking` adds the final
split metrics and closes the trackers. Accelerate logs from the main process only.

Where things go by default:
- TensorBoard: event files in RUN/tensorboard/<project>/ (`tensorboard --logdir RUN/tensorboard`);
- MLflow: a SQLite store, RUN/mlflow/mlflow.db, artifacts in RUN/mlflow/artifacts
  (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`). SQLite rather than a folder of
  files: MLflow 3 refuses its file store unless an environment variable opts in, and SQLite is the
  local store MLflow recommends; it is one file, and `mlflow.search_runs` reads it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from tunewright.config import TrackingConfig, TunewrightConfig, config_to_dict
from tunewright.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
TRACKING_FOLDERS = (TENSORBOARD_DIR, MLFLOW_DIR)  # what tracking writes into a run folder
# Each tracker: the modules it needs, and how to install them.
REQUIREMENTS = {
    "tensorboard": (("tensorboard",), "pip install 'tunewright[tracking]'"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'tunewright[tracking]'"),
    "wandb": (("wandb",), "pip install wandb"),
    "trackio": (("trackio",), "pip install trackio"),
}
_mlflow_uri_before: list[str] = []  # the tracking URI MLflow had before a run set its own (restored after)


def tracker_names(tracking: TrackingConfig) -> list[str]:
    """The Accelerate tracker names the section asks for.

    Raises:
        ConfigError: a tracker's library is not installed (names the key and the install command).
    """
    names = [name for name in ("tensorboard", "mlflow", "wandb", "trackio") if getattr(tracking, name)]
    for name in names:
        modules, install = REQUIREMENTS[name]
        if name == "mlflow" and tracking.mlflow and tracking.mlflow.tracking_uri:
            modules = ("mlflow",)  # the SQLite store's libraries serve only the default store
        missing = [module for module in modules if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(f"tracking.{name}: the {missing[0]} package is not installed; {install}, "
                              f"or remove tracking.{name}")
    return names


def accelerator_options(tracking: TrackingConfig, run_dir: Path) -> dict[str, Any]:
    """Keyword arguments of `Accelerator` for the trackers asked for (none: no options).

    Nothing is written yet: Accelerate creates each tracker in `init_trackers` (start_tracking).
    """
    names = tracker_names(tracking)
    if not names:
        return {}
    folders = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR))
    return {"log_with": names, "project_config": folders}


def default_mlflow_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / MLFLOW_DIR / 'mlflow.db').resolve()}"


def flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"trainer": {"seed": 1}}` -> `{"trainer.seed": 1}`; lists and nulls as JSON text (trackers take scalars)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_values(value, f"{prefix}{key}."))
        else:
            plain = isinstance(value, (bool, int, float, str))
            flat[f"{prefix}{key}"] = value if plain else json.dumps(value)
    return flat


def hardware(accelerator: Accelerator) -> dict[str, Any]:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "processes": accelerator.num_processes,
            "cpu_count": os.cpu_count() or 0, "torch": torch.__version__, "transformers": version("transformers"),
            "tunewright": version("tunewright")}


def start_tracking(accelerator: Accelerator, config: TunewrightConfig, run_dir: Path,
                   parameters: dict[str, int]) -> None:
    """Start the trackers (if any) and log, once, the resolved config, the parameter counts and the hardware."""
    if not accelerator.log_with:
        return
    tracking, init_kwargs = config.tracking, {}
    if tracking.mlflow is not None:
        init_kwargs["mlflow"] = {"run_name": run_dir.name, "tags": {"tunewright.run_dir": str(run_dir.resolve())}}
        uri = tracking.mlflow.tracking_uri
        if uri is None:
            uri = default_mlflow_uri(run_dir)
            (run_dir / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
            init_kwargs["mlflow"]["logging_dir"] = str((run_dir / MLFLOW_DIR / "artifacts").resolve())
        if accelerator.is_main_process:
            set_mlflow_uri(uri)
    once = {**config_to_dict(config), "parameters": parameters, "hardware": hardware(accelerator)}
    accelerator.init_trackers(tracking.project, config=flat_values(once), init_kwargs=init_kwargs)


def set_mlflow_uri(uri: str) -> None:
    # Accelerate's MLflow tracker takes no URI: MLflow's own (process-wide) setting, restored by finish_tracking.
    import mlflow

    _mlflow_uri_before.append(mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else "")  # type: ignore[no-untyped-call]
    mlflow.set_tracking_uri(uri)


def tracked_values(record: dict[str, Any]) -> dict[str, float]:
    """A training-log record as tracker metrics: `train/loss`, `train/learning_rate`, `validation/exact_match`."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = value
    return values


def log_record(accelerator: Accelerator, record: dict[str, Any]) -> None:
    """One training-log record (a step, with its validation metrics after an evaluation) to every tracker."""
    if accelerator.trackers:
        accelerator.log(tracked_values(record), step=record["step"])


def finish_tracking(accelerator: Accelerator, metrics: dict[str, Any] | None = None, step: int = 0) -> None:
    """Log the final split metrics (`final/validation/...`), then close every tracker. Safe to call twice."""
    if not accelerator.trackers:
        return
    if metrics:
        final = {f"final/{split}/{name}": value for split, values in metrics.items() if isinstance(values, dict)
                 for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        accelerator.log(final, step=step)
    # Not accelerator.end_training(): it also ends the process group, which the run still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
    if _mlflow_uri_before:
        import mlflow

        mlflow.set_tracking_uri(_mlflow_uri_before.pop())


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by torch on a GPU, else the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
