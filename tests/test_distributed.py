"""`accelerate launch` runs the same training loop with DDP (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import copy_rows

import tunewright


def test_accelerate_launch_trains_with_two_processes(tmp_path: Path, tiny_config: dict) -> None:
    config = {**tiny_config, "trainer": {"epochs": 2, "batch_size": 4, "learning_rate": 0.01}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    copy_rows(32).to_csv(tmp_path / "data.csv", index=False)
    launcher = Path(sys.executable).with_name("accelerate")
    # On a machine without GPUs, accelerate's --multi_gpu launcher starts gloo CPU processes (MULTI_CPU).
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunewright.cli", "--quiet", "train",
               "-c", str(tmp_path / "config.yaml"), "-d", str(tmp_path / "data.csv"), "-o", str(tmp_path / "run")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    # 24 training rows, batch 4 on each of 2 processes: 3 optimizer steps per epoch.
    steps = [json.loads(line)["step"] for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(tunewright.predict(run_dir, copy_rows(4))) == 4
