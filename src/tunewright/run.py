"""The run folder: resolved config, weights (peft adapter or full safetensors), tokenizer, metrics, log.

A run folder is complete only when `run.json` says so. That marker is written last and
atomically, so a run that was interrupted or failed never looks complete, and loading refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from tunewright import __version__
from tunewright.config import TunewrightConfig, load_config, save_config
from tunewright.errors import RunFolderError

RunStatus = Literal["running", "complete", "failed", "interrupted"]
WeightsKind = Literal["adapter", "full", "none"]
STATUS_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TRAINING_LOG_FILE = "training_log.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_WEIGHTS_FILE = "model.safetensors"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2, default=float)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        status: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return status
    except json.JSONDecodeError:
        return {}


def set_status(run_dir: Path, status: RunStatus, **fields: Any) -> None:
    current = read_status(run_dir)
    current.update(fields, status=status, tunewright_version=__version__, updated=time.time())
    write_json_atomic(run_dir / STATUS_FILE, current)


def start_run(run_dir: Path, config: TunewrightConfig, overwrite: bool = False) -> None:
    """Create the folder (refusing to clobber an existing run unless asked) and save the resolved config."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"{run_dir}: the output folder already holds a run; pass --overwrite or choose another folder"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_status(run_dir, "running", started=time.time())
    save_config(config, run_dir / CONFIG_FILE)


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / TRAINING_LOG_FILE).open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(run_dir / METRICS_FILE, metrics)


def weights_kind(run_dir: Path) -> WeightsKind:
    if (run_dir / ADAPTER_CONFIG_FILE).is_file():
        return "adapter"
    if (run_dir / FULL_WEIGHTS_FILE).is_file() or (run_dir / "model.safetensors.index.json").is_file():
        return "full"
    return "none"


def check_complete(run_dir: str | Path) -> Path:
    """The run folder, if it is a complete run; else a clear error saying what is wrong.

    Raises:
        RunFolderError: missing folder, not a run folder, or a run that did not finish.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(f"{run_dir}: not a tunewright run folder (no {CONFIG_FILE})")
    status = read_status(run_dir).get("status")
    if status != "complete":
        state = status or "unknown"
        raise RunFolderError(
            f"{run_dir}: the run is {state}, not complete; resume it with `tunewright train --resume` or retrain"
        )
    return run_dir


def load_run_config(run_dir: Path) -> TunewrightConfig:
    return load_config(run_dir / CONFIG_FILE)
