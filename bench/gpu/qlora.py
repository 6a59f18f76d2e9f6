"""QLoRA on a GPU: 4-bit nf4 + LoRA trains, checkpoints, resumes, saves, loads and predicts; peak memory
against bf16 LoRA on the same model. One JSON line out.

    python bench/gpu/qlora.py MODEL_DIR DATA_CSV WORK_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

import tunewright
from tunewright.errors import TunewrightError


def config(model: str, steps: int, quantized: bool) -> dict[str, object]:
    return {"base_model": model, "input_features": [{"name": "prompt"}], "output_features": [{"name": "output"}],
            "prompt": {"template": "{prompt}"},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "trainer": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-4, "checkpoint_steps": 3,
                        "precision": "bf16"},
            "preprocessing": {"split": [1.0, 0.0, 0.0], "max_target_length": 128},
            "generation": {"max_new_tokens": 16}, **({"quantization": {"bits": 4}} if quantized else {})}


def sigterm_after_first_checkpoint(run: Path) -> threading.Thread:
    """SIGTERM this process once the run has written a checkpoint (it saves another one and stops)."""

    checkpoints = run / "checkpoints"

    def watch() -> None:
        while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def train_peak(model: str, rows: pd.DataFrame, run: Path, quantized: bool, interrupt: bool = False,
               resume: bool = False) -> float:
    """Peak GPU memory of a 6-step run (checkpoints every 3 steps); `interrupt`: SIGTERM after the first."""
    torch.cuda.reset_peak_memory_stats()
    if interrupt:
        sigterm_after_first_checkpoint(run)
    try:
        tunewright.train(config(model, 6, quantized), rows, run, show_progress=False, resume=resume)
    except TunewrightError as error:
        print(f"{run.name}: {error}")
    return torch.cuda.max_memory_allocated() / 2**20


def main(model: str, data: Path, work: Path, out: Path) -> None:
    rows = pd.read_csv(data).head(200)
    result: dict[str, object] = {}
    result["lora_bf16_peak_mib"] = train_peak(model, rows, work / "lora", quantized=False)
    result["qlora_peak_mib"] = train_peak(model, rows, work / "qlora", quantized=True, interrupt=True)
    result["qlora_status_after_sigterm"] = json.loads((work / "qlora" / "run.json").read_text())["status"]
    train_peak(model, rows, work / "qlora", quantized=True, resume=True)
    result["qlora_status_after_resume"] = json.loads((work / "qlora" / "run.json").read_text())["status"]
    log = [json.loads(line) for line in (work / "qlora" / "training_log.jsonl").read_text().splitlines()]
    result["qlora_steps_logged"] = [record["step"] for record in log]
    result["qlora_predictions"] = len(tunewright.predict(work / "qlora", rows.head(4)[["prompt"]]))
    try:
        tunewright.export(work / "qlora", work / "merged", merge=True)
        result["qlora_merge"] = "merged"
    except TunewrightError as error:
        result["qlora_merge"] = f"refused: {error}"
    print(json.dumps(result))
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
