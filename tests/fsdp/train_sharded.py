"""Worker for tests/test_fsdp.py: train the tiny LoRA objective under torch's FSDP2 (`fully_shard`) on gloo.

Run by torchrun with 2 CPU processes. Each process takes every other sample of each step; the losses of
each step (fit()'s batches, summed over processes, normalised by the step's target tokens as fit() does) go to argv[1].
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from test_precision import copy_examples, lora  # noqa: E402

from tunewright.kernels.gpu_training import decoder_layers  # noqa: E402
from tunewright.packing import collate_micro_batch  # noqa: E402
from tunewright.train import epoch_batches  # noqa: E402

STEPS, BATCH, LR, SEED = 4, 4, 0.01, 0


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    objective = lora()
    for layer in decoder_layers(objective.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    parameters = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    examples = copy_examples()
    objective.train()
    losses = []
    for window in epoch_batches(len(examples), BATCH, SEED, epoch=0)[:STEPS]:  # fit()'s order
        tokens = sum(sum(label != -100 for label in examples[i].labels[1:]) for i in window)
        batch = collate_micro_batch([examples[i] for i in window[rank::world]], 0, packing=True)
        out = objective(**batch)
        # FSDP averages gradients over processes: scale back up, as fit() does for DDP.
        (out.loss_sum * world / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        step_loss = out.loss_sum.detach() / tokens
        dist.all_reduce(step_loss)
        losses.append(step_loss.item())
    if rank == 0:
        sharded = sum(isinstance(p, torch.distributed.tensor.DTensor) for p in objective.parameters())
        json.dump({"losses": losses, "sharded_parameters": sharded}, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
