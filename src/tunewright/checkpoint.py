"""Training checkpoints: written atomically, kept K at a time, and enough to resume bit for bit.

A checkpoint is a folder `RUN/checkpoints/step-000123/` holding

- `weights.safetensors`: the trainable weights (the adapter, or every weight when fully fine-tuning);
- `best_weights.safetensors`: the best validation weights so far (early stopping), when there are any;
- `training_state.pt`: optimizer, scheduler and RNG states (tensors and plain values only, read back
  with `torch.load(weights_only=True)`, which cannot run code);
- `trainer_state.json`: the step, early-stopping counters, the log so far and the run's fingerprint.

It is written into a hidden temporary folder that is renamed into place once every file is on disk,
so a checkpoint either exists whole or not at all, whatever kills the process. Because the batch
order is a pure function of (seed, epoch) (see `train.optimizer_windows`), the step number is the
whole data position: resuming replays the first `step` optimizer windows without training on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from tunewright.config import TunewrightConfig, config_to_dict
from tunewright.errors import ModelLoadError, RunFolderError
from tunewright.model import check_safetensors_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "weights.safetensors"
BEST_WEIGHTS_FILE = "best_weights.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
NAME_PATTERN = re.compile(r"step-(\d+)")
TEMPORARY_PREFIX = ".tmp-"
# Trainer settings that decide which samples form each optimizer step: changing one would make
# "resume at step N" mean different data, so a resume refuses it like a different dataset.
DATA_ORDER_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "group_by_length")


@dataclass
class TrainerState:
    """The loop's own state at an optimizer-step boundary (what `trainer_state.json` holds)."""

    step: int = 0
    micro_batch_size: int | None = None  # smaller than trainer.batch_size after an out-of-memory halving
    best_val_loss: float | None = None
    eval_metric: str | None = None  # trainer.eval_metric that best_metric is in (None: an older checkpoint, loss)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    skipped_steps: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)
    time_budget: dict[str, float] | None = None  # the step count trainer.time_budget chose (kept on resume)


@dataclass
class Checkpoint:
    """A checkpoint read back into memory, ready for `train.fit(resume=...)`."""

    path: Path
    state: TrainerState
    weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor] | None
    training_state: dict[str, Any]  # optimizer, scheduler, rng


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    """Every random number generator training may draw from (dropout, shuffles, user code)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # weights_only loading accepts no numpy arrays, so the key array travels as a list.
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_folder(folder: Path) -> None:
    # A rename is durable only once the folder holding it is flushed too.
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share memory (tied embeddings); contiguous copies never do.
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, path)


def save_checkpoint(
    directory: Path,
    state: TrainerState,
    weights: dict[str, torch.Tensor],
    best_weights: dict[str, torch.Tensor] | None,
    training_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write one checkpoint atomically (temporary folder, then rename) and keep the newest `keep`.

    Returns:
        The checkpoint folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state.step)
    if final.is_dir():
        return final  # this step is already saved (e.g. an interrupt right after a periodic checkpoint)
    staging = directory / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _save_weights(weights, staging / WEIGHTS_FILE)
    if best_weights is not None:
        _save_weights(best_weights, staging / BEST_WEIGHTS_FILE)
    torch.save(training_state, staging / TRAINING_STATE_FILE)
    state_text = json.dumps(asdict(state), indent=1, default=float)
    (staging / TRAINER_STATE_FILE).write_text(state_text, encoding="utf-8")
    for path in staging.iterdir():
        _fsync_file(path)
    os.replace(staging, final)
    _fsync_folder(directory)
    prune_checkpoints(directory, keep)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (temporary folders never match), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = NAME_PATTERN.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(directory: Path) -> None:
    """Delete temporary folders left by a process killed while writing a checkpoint."""
    if directory.is_dir():
        for path in directory.glob(f"{TEMPORARY_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: Path) -> TrainerState:
    """The JSON part of a checkpoint (cheap: enough to check a resume before loading any model)."""
    state_file = path / TRAINER_STATE_FILE
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        return TrainerState(**raw)
    except (OSError, ValueError, TypeError) as error:
        raise RunFolderError(
            f"{state_file}: unreadable checkpoint state ({type(error).__name__}); delete {path} to resume "
            "from the checkpoint before it"
        ) from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        check_safetensors_file(path)
        return load_file(path)
    except ModelLoadError as error:
        hint = "to resume from the checkpoint before it"
        raise RunFolderError(f"{error}; delete {path.parent} {hint}") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder back; a damaged file is named in the error.

    Raises:
        RunFolderError: a file is missing, truncated or corrupted.
    """
    state = read_trainer_state(path)
    best_path = path / BEST_WEIGHTS_FILE
    state_path = path / TRAINING_STATE_FILE
    try:
        training_state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise RunFolderError(
            f"{state_path}: damaged checkpoint file ({type(error).__name__}); delete {path} to resume from "
            "the checkpoint before it"
        ) from None
    return Checkpoint(
        path=path,
        state=state,
        weights=_load_weights(path / WEIGHTS_FILE),
        best_weights=_load_weights(best_path) if best_path.is_file() else None,
        training_state=training_state,
    )


def frame_hash(frame: pd.DataFrame) -> str:
    """A stable hash of a table's column names and cell values (not of its row index)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(name) for name in frame.columns]).encode())
    digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def run_fingerprint(
    config: TunewrightConfig, train: pd.DataFrame, validation: pd.DataFrame
) -> dict[str, str]:
    """What a checkpoint belongs to: model, adapter, prompt, data and data order.

    Other trainer settings (learning rate, max_steps, on_nonfinite, ...) may change on resume.
    """
    resolved = config_to_dict(config)
    columns = [*config.input_columns, config.output_feature.name]
    fingerprint = {
        key: json.dumps(resolved[key], sort_keys=True)
        for key in ("base_model", "adapter", "input_features", "output_features", "prompt", "preprocessing")
    }
    if resolved.get("conversation") is not None:  # its masks decide what trains (absent: older fingerprints hold)
        fingerprint["conversation"] = json.dumps(resolved["conversation"], sort_keys=True)
    for key in DATA_ORDER_KEYS:
        if key in resolved["trainer"]:
            fingerprint[f"trainer.{key}"] = json.dumps(resolved["trainer"][key])
    fingerprint["dataset.train"] = frame_hash(train[columns])
    fingerprint["dataset.validation"] = frame_hash(validation[columns])
    return fingerprint


def fingerprint_differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """Keys whose value differs, with both values when they are short enough to read."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if before == after:
            continue
        if key.startswith("dataset.") or len(str(before)) + len(str(after)) > 80:
            differences.append(key)
        else:
            differences.append(f"{key} ({before} -> {after})")
    return differences
