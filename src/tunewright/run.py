"""The run folder: resolved config, weights (peft adapter or full safetensors), tokenizer, metrics, log.

A run folder is complete only when `run.json` says so. That marker is written last and
atomically, so a run that was interrupted or failed never looks complete, and loading refuses it.
It also records a SHA-256 of every file that loading can read (see `sealed_files`): a file
changed, removed or added later is named on load, and so is a folder without that record.
`seal_run` (`tunewright seal RUN`) records them again after a deliberate edit. Nothing in the
folder decides whether remote code may run: `load_run_config` sets trust_remote_code from the
person's choice only (see trust.py).
Training checkpoints live in `checkpoints/` (see checkpoint.py); `resume_run` continues from them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable
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
from tunewright.output_folder import (
    check_outside_sources,
    check_replaceable,
    describe_entries,
    entry_names,
    remove_entries,
)
from tunewright.trust import saved_run_backend

log = logging.getLogger(__name__)

RunStatus = Literal["running", "complete", "failed", "interrupted"]
WeightsKind = Literal["adapter", "full", "none"]
STATUS_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TRAINING_LOG_FILE = "training_log.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_KEY = "files_sha256"
# Written into the run folder but never read when loading it: outside the checksums. checkpoints/
# is read only by `train --resume`, which refuses a complete run (and checks each checkpoint itself).
UNSEALED_NAMES = (STATUS_FILE, METRICS_FILE, TRAINING_LOG_FILE, "confusion_matrix_*.png", "predictions_*.jsonl",
                  "report.html")


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
    """Update `run.json`; marking a run complete also records the checksums of the files loading reads."""
    current = read_status(run_dir)
    if status == "complete":
        current.pop("weights_sha256", None)  # what older versions recorded: the weights files only
        fields[CHECKSUMS_KEY] = file_checksums(run_dir)
    current.update(fields, status=status, tunewright_version=version("tunewright"), updated=time.time())
    write_json_atomic(run_dir / STATUS_FILE, current)


def start_run(run_dir: Path, config: TunewrightConfig, overwrite: bool = False,
              sources: Iterable[tuple[str, Path]] = ()) -> None:
    """Create the folder and save the resolved config.

    An existing run is replaced only with `overwrite`, and only if the folder holds nothing but what
    tunewright writes; a run that failed before training began is simply started again.

    Args:
        sources: (what it is, path) pairs the run reads (the dataset, `--from-run`); the folder
            may not be, contain or lie inside one.

    Raises:
        RunFolderError: the folder is a source, holds a run (without `overwrite`) or files tunewright
            did not write.
    """
    check_outside_sources(run_dir, sources)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder; choose a folder path for the run")
    if entry_names(run_dir):
        if never_started(run_dir):
            log.info("%s: the previous attempt stopped before training began (%s); starting again", run_dir,
                     read_status(run_dir).get("error") or "no error recorded")
        elif not overwrite:
            raise RunFolderError(_occupied_message(run_dir))
        else:
            check_replaceable(run_dir, "run folder", STATUS_FILE)
            log.info("%s: --overwrite: replacing the run in this folder", run_dir)
        remove_entries(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_status(run_dir, "running", started=time.time(), pid=os.getpid(), host=socket.gethostname())
    save_config(config, run_dir / CONFIG_FILE)


def never_started(run_dir: Path) -> bool:
    """Whether the folder holds only a run that stopped before its first training step (a bad base model,
    target_modules that match nothing, Ctrl-C while loading): nothing in it is worth keeping."""
    status = read_status(run_dir)
    if set(entry_names(run_dir)) - {STATUS_FILE, CONFIG_FILE} or "tunewright_version" not in status:
        return False
    state = status.get("status")
    # A `running` run on another host may still be loading its model: only one here whose process is gone.
    stale = state == "running" and status.get("host") == socket.gethostname() and not _still_running(status)
    return state in ("failed", "interrupted") or stale


def _occupied_message(run_dir: Path) -> str:
    if (run_dir / STATUS_FILE).is_file():
        return (f"{run_dir}: the output folder already holds a run; pass --overwrite to replace it, --resume "
                "to continue it, or choose another folder")
    return (f"{run_dir}: the output folder holds {describe_entries(entry_names(run_dir))} and is not a tunewright "
            "run folder; choose a new or empty folder")


def resume_run(run_dir: Path, config: TunewrightConfig, fingerprint: dict[str, str]) -> Path | None:
    """Reopen an unfinished run for training; returns its newest checkpoint (None: start from step 0).

    Refuses, before anything in the folder changes, a complete run and a checkpoint made with a
    different model, adapter, prompt, dataset or data order (the differing keys are listed).
    A folder that does not exist yet simply starts a new run.
    """
    if not run_dir.is_dir() or not entry_names(run_dir):
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


def sealed_files(run_dir: Path) -> list[str]:
    """Every file under the run folder that loading may read, as sorted relative POSIX paths.

    That is everything but run.json, metrics.json, training_log.jsonl, the confusion matrices,
    predictions_*.jsonl, report.html, checkpoints/ and the trackers' tensorboard/ and mlflow/:
    transformers reads files named inside other files (an `auto_map` names Python modules), so no
    list of names tunewright expects would be complete.

    Raises:
        RunFolderError: a symlinked folder or something that is not a regular file, which cannot be checked.
    """
    found = []
    for folder, subfolders, files in os.walk(run_dir):
        here = Path(folder)
        top = here == run_dir
        for name in subfolders:
            if (here / name).is_symlink():
                raise RunFolderError(
                    f"{here / name}: a symlinked folder in a run folder cannot be checked; replace it with a copy"
                )
        if top:  # checkpoints, and the trackers' files (tracking.TRACKING_FOLDERS), which MLflow's UI may update
            subfolders[:] = [name for name in subfolders if name not in (CHECKPOINT_DIR, "tensorboard", "mlflow")]
        subfolders.sort()
        for name in files:
            if top and any(fnmatch.fnmatchcase(name, pattern) for pattern in UNSEALED_NAMES):
                continue
            if not (here / name).is_file():
                raise RunFolderError(f"{here / name}: not a regular file; remove it from the run folder")
            found.append((here / name).relative_to(run_dir).as_posix())
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file in `sealed_files`, by relative path."""
    return {name: file_sha256(run_dir / name) for name in sealed_files(run_dir)}


def _reseal_hint(run_dir: Path) -> str:
    return f"if you changed the folder on purpose, run `tunewright seal {run_dir}` to record its files again"


def verify_weights(run_dir: Path, recorded: Any) -> None:
    """Refuse pickle files, damaged weights, and any file changed, missing or added since the checksums were
    recorded, naming the file; a folder without a checksum record is refused too.

    Raises:
        RunFolderError: the first problem found.
    """
    check_weight_files(run_dir)
    _verify_checksums(run_dir, recorded)


def check_weight_files(run_dir: Path) -> None:
    """Refuse pickle files and truncated or corrupted safetensors files at the top of the run folder."""
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


def _verify_checksums(run_dir: Path, recorded: Any) -> None:
    if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
        raise RunFolderError(
            f"{run_dir / STATUS_FILE}: no checksums of the run's files ('{CHECKSUMS_KEY}'; an older tunewright "
            f"recorded weights only), so its files cannot be checked; retrain, or {_reseal_hint(run_dir)}"
        )
    present = sealed_files(run_dir)
    missing = sorted(set(recorded) - set(present))
    if missing:
        name = missing[0]
        raise RunFolderError(
            f"{run_dir / name}: file missing (its checksum is recorded in {STATUS_FILE}); restore it or retrain, "
            f"or {_reseal_hint(run_dir)}"
        )
    for name in present:
        if name not in recorded:
            raise RunFolderError(
                f"{run_dir / name}: file added after training (no checksum recorded in {STATUS_FILE}); "
                f"remove it, or {_reseal_hint(run_dir)}"
            )
        if file_sha256(run_dir / name) != recorded[name]:
            kind = "weights file" if name.endswith(".safetensors") else "file"
            raise RunFolderError(
                f"{run_dir / name}: {kind} corrupted or changed since training (checksum mismatch); restore it "
                f"or retrain, or {_reseal_hint(run_dir)}"
            )


def _require_run_folder(run_dir: Path) -> None:
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


def seal_run(run_dir: str | Path) -> dict[str, list[str]]:
    """Record the checksums of a complete run's files again, after a deliberate edit; returns what changed.

    Sealing checks integrity only: it does not make the folder's code trusted (see trust.py).

    Raises:
        RunFolderError: not a complete run folder, pickle files, damaged safetensors or unreadable entries.
    """
    run_dir = Path(run_dir)
    _require_run_folder(run_dir)
    status = read_status(run_dir)
    previous = status.get(CHECKSUMS_KEY)
    previous = previous if isinstance(previous, dict) else {}
    check_weight_files(run_dir)  # pickles and damaged safetensors are refused, not sealed
    current = file_checksums(run_dir)
    status.pop("weights_sha256", None)
    status[CHECKSUMS_KEY] = current
    status["sealed"] = time.time()
    write_json_atomic(run_dir / STATUS_FILE, status)
    return {
        "added": sorted(set(current) - set(previous)),
        "changed": sorted(name for name in current if name in previous and previous[name] != current[name]),
        "removed": sorted(set(previous) - set(current)),
    }


def check_complete(run_dir: str | Path) -> Path:
    """The run folder, if it is a complete run with intact weights; else a clear error saying what is wrong.

    Raises:
        RunFolderError: missing folder, not a run folder, a run that did not finish, damaged weights, or
            files changed, missing or added since their checksums were recorded.
    """
    run_dir = Path(run_dir)
    _require_run_folder(run_dir)
    verify_weights(run_dir, read_status(run_dir).get(CHECKSUMS_KEY))
    return run_dir


def load_run_config(run_dir: Path, trust_remote_code: bool | None = None) -> TunewrightConfig:
    """The run's saved config, with backend.trust_remote_code and allow_pickle_weights set by the person only
    (the saved values are ignored): `trust_remote_code` when given, else TUNEWRIGHT_TRUST_REMOTE_CODE, and
    TUNEWRIGHT_ALLOW_PICKLE_WEIGHTS."""
    config = load_config(run_dir / CONFIG_FILE)
    return config.model_copy(update={"backend": saved_run_backend(config.backend, trust_remote_code)})


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
