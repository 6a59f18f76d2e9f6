"""FSDP2 on 2 CPU processes (torch's gloo backend): the LoRA objective trains sharded to the same losses.

What this proves on a CPU: tunewright's objective (packed rows, per-sample attention, the fused LM-head
loss) runs under torch's `fully_shard` with parameters sharded across processes, and takes the same steps
as one process does. Accelerate itself turns an FSDP config into plain multi-CPU DDP on a CPU (its FSDP
needs GPUs), so `accelerate launch --config_file examples/accelerate/fsdp2.yaml` is exercised only on GPUs.
Tolerance: fp32, 1e-5 relative (the gradient reduction sums in another order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from test_precision import copy_examples, lora

from tunewright.config import TrainerConfig
from tunewright.train import fit

WORKER = Path(__file__).with_name("fsdp") / "train_sharded.py"
ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch's gloo backend")


def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "sharded.json"
    launcher = Path(sys.executable).with_name("torchrun")
    finished = subprocess.run([str(launcher), "--nproc_per_node", "2", str(WORKER), str(out)],
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["sharded_parameters"] > 0
    cfg = TrainerConfig(max_steps=4, batch_size=4, learning_rate=0.01, lr_scheduler="constant", precision="fp32",
                        max_grad_norm=None, seed=0)
    result = fit(lora(), copy_examples(), [], cfg, Accelerator(cpu=True), pad_id=0, show_progress=False)
    assert sharded["losses"] == pytest.approx([record["loss"] for record in result.history], rel=1e-5)


def test_the_documented_fsdp2_config_is_an_accelerate_fsdp2_config() -> None:
    config = yaml.safe_load(ACCELERATE_CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
