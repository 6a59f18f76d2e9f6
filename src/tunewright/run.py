"""The run folder: resolved config, weights (peft adapter or full safetensors), tokenizer, metrics, log.

A run folder is complete only when `run.json` says so. That marker is written last and
atomically, so a run that was interrupted or failed never looks complete, and loading refuses it.
It also records a SHA-256 of every weights file, so a file damaged later is named on load.
Training checkpoints live in `checkpoints/` (see checkpoint.py); `resume_run` continues from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from tunewright.checkpoint import (
    CHECKPOINT_DIR,
    fingerprint_differences,
    latest_checkpoint,
    read_trainer_state,
    remove_partial_checkpoints,
)
from tunewright.config import TunewrightConfig, load_config, save_config
from tunewright.errors import ConfigError, RunFolderError, TunewrightError
from tunewright.model import PICKLE_WEIGHT_SUFFIXES, check_safetensors_file

log = logging.getLogger(__name__)

RunStatus = Literal["running", "complete", "failed", "interrupted"]
WeightsKind = Literal["adapter", "full", "none"]
STATUS_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TRAINING_LOG_FILE = "training_log.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_WEIGHTS_FILE = "model.safetensors"


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


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
    """Update `run.json`; marking a run complete also records the checksums of its weights files."""
    current = read_status(run_dir)
    if status == "complete":
        fields["weights_sha256"] = weight_checksums(run_dir)
    current.update(fields, status=status, tunewright_version=version("tunewright"), updated=time.time())
    write_json_atomic(run_dir / STATUS_FILE, current)


def start_run(run_dir: Path, config: TunewrightConfig, overwrite: bool = False) -> None:
    """Create the folder (refusing to clobber an existing run unless asked) and save the resolved config."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunFolderError(
                f"{run_dir}: the output folder already holds a run; pass --overwrite to replace it, --resume "
                "to continue it, or choose another folder"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_status(run_dir, "running", started=time.time(), pid=os.getpid(), host=socket.gethostname())
    save_config(config, run_dir / CONFIG_FILE)


def resume_run(run_dir: Path, config: TunewrightConfig, fingerprint: dict[str, str]) -> Path | None:
    """Reopen an unfinished run for training; returns its newest checkpoint (None: start from step 0).

    Refuses, before anything in the folder changes, a complete run and a checkpoint made with a
    different model, adapter, prompt, dataset or data order (the differing keys are listed).
    A folder that does not exist yet simply starts a new run.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        log.info("%s: nothing to resume yet; starting a new run", run_dir)
        start_run(run_dir, config)
        return None
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(f"{run_dir}: not a tunewright run folder (no {CONFIG_FILE}); cannot resume it")
    status = read_status(run_dir)
    if status.get("status") == "complete":
        raise RunFolderError(
            f"{run_dir}: the run is already complete; nothing to resume (--overwrite: retrain)"
        )
    if status.get("status") == "running" and _still_running(status):
        raise RunFolderError(
            f"{run_dir}: the run is still training in process {status['pid']}; stop it first (SIGTERM saves "
            "a checkpoint), then resume"
        )
    checkpoint = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if checkpoint is not None:
        differences = fingerprint_differences(read_trainer_state(checkpoint).fingerprint, fingerprint)
        if differences:
            raise RunFolderError(
                f"{run_dir}: cannot resume: {checkpoint.name} was made with a different "
                f"{', '.join(differences)}; resume with the original config and data, or pass --overwrite"
            )
    remove_partial_checkpoints(run_dir / CHECKPOINT_DIR)
    step = read_trainer_state(checkpoint).step if checkpoint is not None else 0
    truncate_log(run_dir, step)
    save_config(config, run_dir / CONFIG_FILE)
    set_status(run_dir, "running", resumed_from_step=step, error=None, pid=os.getpid(),
               host=socket.gethostname())
    log.info("%s: resuming from %s", run_dir, checkpoint.name if checkpoint else "step 0 (no checkpoint yet)")
    return checkpoint


def _still_running(status: dict[str, Any]) -> bool:
    """Whether the process that wrote a `running` status is alive on this machine."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or status.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def truncate_log(run_dir: Path, step: int) -> None:
    """Keep the training-log lines up to `step` (later ones are redone by the resumed run)."""
    path = run_dir / TRAINING_LOG_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


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


def weight_checksums(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every weights file at the top of the run folder."""
    checksums = {}
    for path in sorted(run_dir.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        checksums[path.name] = digest.hexdigest()
    return checksums


def verify_weights(run_dir: Path, recorded: dict[str, str] | None) -> None:
    """Refuse pickle files, and truncated, corrupted, missing or changed weights files, naming the file.

    Raises:
        RunFolderError: the first problem found.
    """
    pickles = sorted(path.name for path in run_dir.iterdir() if path.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise RunFolderError(
            f"{run_dir / pickles[0]}: pickle weights in a run folder (tunewright writes safetensors only; "
            "a pickle can run code when loaded); delete it"
        )
    for path in sorted(run_dir.glob("*.safetensors")):
        try:
            check_safetensors_file(path)
        except TunewrightError as error:
            raise RunFolderError(str(error)) from None
    if recorded is None:
        return  # a run folder from before checksums were recorded
    current = weight_checksums(run_dir)
    for name, checksum in recorded.items():
        if name not in current:
            raise RunFolderError(f"{run_dir / name}: weights file missing; restore it or retrain")
        if current[name] != checksum:
            raise RunFolderError(
                f"{run_dir / name}: weights file corrupted or changed since training (checksum mismatch); "
                "restore it or retrain"
            )


def check_complete(run_dir: str | Path) -> Path:
    """The run folder, if it is a complete run with intact weights; else a clear error saying what is wrong.

    Raises:
        RunFolderError: missing folder, not a run folder, a run that did not finish, or damaged weights.
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
    verify_weights(run_dir, read_status(run_dir).get("weights_sha256"))
    return run_dir


def load_run_config(run_dir: Path) -> TunewrightConfig:
    return load_config(run_dir / CONFIG_FILE)


def check_continuable(from_run: str | Path, config: TunewrightConfig) -> Path:
    """The run folder to continue training from, if it fits the new config.

    Continuing trains the saved weights further (the adapter, or the full weights), so the new
    config must name the same base model and the same adapter section.

    Raises:
        RunFolderError: the run is incomplete or saved no weights.
        ConfigError: base_model or adapter differ from the run's, or trainer.type is none.
    """
    if config.trainer.type == "none":
        raise ConfigError("trainer.type: 'none' trains nothing; continuing from a run needs 'finetune'")
    run_dir = check_complete(from_run)
    previous = load_run_config(run_dir)
    if weights_kind(run_dir) == "none":
        raise RunFolderError(
            f"{run_dir}: the run saved no weights (trainer.type none); nothing to continue from"
        )
    if previous.base_model != config.base_model:
        raise ConfigError(
            f"base_model: '{config.base_model}' is not the base model of {run_dir} "
            f"('{previous.base_model}'); "
            "continue with the same base model"
        )
    if previous.adapter != config.adapter:
        raise ConfigError(
            f"adapter: differs from the adapter section of {run_dir}; continuing trains the saved weights, "
            "so copy that run's adapter section"
        )
    return run_dir


def weights_source(config: TunewrightConfig, from_run: Path | None) -> str:
    """What to load as the base model: the run's full weights when continuing a full fine-tune."""
    if from_run is not None and weights_kind(from_run) == "full":
        return str(from_run)
    return config.base_model
