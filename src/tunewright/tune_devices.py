"""`tunewright tune` on several devices: one worker process per device, all drawing trials from one study.

Each worker is `python -m tunewright.tune_devices ...`: it opens the search's study.db (SQLite, which
Optuna shares between processes), sees only its own device (CUDA_VISIBLE_DEVICES), and runs trials until
the study holds the finished trials asked for. The parent waits for them, then writes the search's files
from the study as a one-process search does. Workers log to OUTPUT/workers/.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunewright.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

WORKERS_DIR = "workers"
POLL_SECONDS = 2.0


def parse_devices(text: str) -> list[str]:
    """`cpu`, CUDA indices or `cuda:N`, comma-separated -> canonical names ('cpu', 'cuda:N')."""
    devices = []
    for part in (piece.strip() for piece in text.split(",")):
        index = part.removeprefix("cuda:")
        if part == "cpu":
            devices.append("cpu")
        elif index.isdigit():
            devices.append(f"cuda:{int(index)}")
        else:
            raise ConfigError(f"--devices: '{part}' is not a device; list cpu or CUDA indices, e.g. --devices 0,1")
    return devices


def default_devices(backend_device: str) -> list[str]:
    """Every visible GPU when there are several (and the config does not ask for the CPU); else none: the
    search runs in this process."""
    import torch

    count = torch.cuda.device_count() if backend_device != "cpu" else 0
    return [f"cuda:{index}" for index in range(count)] if count > 1 else []


def worker_environment(device: str) -> dict[str, str]:
    """The environment of a worker: only its own GPU visible (none for the CPU)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:") if device.startswith("cuda:") else ""
    return env


def run_workers(folder: Path, devices: list[str], job: dict[str, Any], finished: Callable[[], int]) -> None:
    """Start one worker per device on the job (see `worker_main`), log each newly finished trial while they
    run, wait for all, and fail on the first that failed, naming its log."""
    logs = folder / WORKERS_DIR
    logs.mkdir(exist_ok=True)
    running = []
    for number, device in enumerate(devices):
        log_path = logs / f"worker-{number}-{device.replace(':', '')}.log"
        stream = log_path.open("w", encoding="utf-8")
        command = [sys.executable, "-m", "tunewright.tune_devices",
                   json.dumps({**job, "device": device, "worker": number})]
        running.append((device, log_path, stream, subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=worker_environment(device))))
    log.info("tune: %d workers (%s), logs in %s", len(devices), ", ".join(devices), logs)
    seen = finished()
    while any(process.poll() is None for *_, process in running):
        time.sleep(POLL_SECONDS)
        if (now := finished()) != seen:
            seen = now
            log.info("tune: %d of %d trials finished", now, job["trials"])
    failures = []
    for device, log_path, stream, process in running:
        if process.returncode != 0:
            failures.append((device, log_path))
        stream.close()
    if failures:
        device, log_path = failures[0]
        lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise TrainingError(f"{log_path}: the worker on {device} failed ({last}); see the log")


def worker_main(job: dict[str, Any]) -> None:
    from tunewright.tune import work_on_study

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work_on_study(Path(job["folder"]), job["trials"], job["device"], job["worker"], job["dataset"],
                  job["validation"], job["time_budget"])


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
