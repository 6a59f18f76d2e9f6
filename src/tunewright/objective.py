"""Training objectives: the model plus its loss in one nn.Module, so DDP/FSDP wrap both.

The loss is returned as a *sum* with the number of target tokens, so the training loop can
normalise by the tokens of a whole gradient-accumulation window (not per micro-batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from tunewright.adapters import adapter_penalty, uses_virtual_tokens
from tunewright.data import IGNORE_INDEX, Example, collate_training
from tunewright.kernels.attention import varlen_kwargs
from tunewright.kernels.gpu_training import liger_linear_cross_entropy, liger_loss_applies
from tunewright.kernels.lm_loss import linear_cross_entropy
from tunewright.model import base_model


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, summed over target tokens (or samples for classifiers)
    count: torch.Tensor  # scalar, number of target tokens (or samples) in the sum
    correct: torch.Tensor  # scalar, argmax predictions equal to the target


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, looking through a peft wrapper (its layers stay injected)."""
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states (B, T, H) without computing the (B, T, V) logits.

    `cu_seq_lens` (sample boundaries of one packed row) lets varlen attention skip cross-sample scores.
    """
    decoder, _ = causal_lm_parts(model)
    extra = varlen_kwargs(cu_seq_lens) if cu_seq_lens is not None else {}
    output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                     **extra)
    return output.last_hidden_state


class LanguageModelObjective(nn.Module):
    """Next-token cross-entropy on target tokens only.

    The LM head runs only on positions whose label is not −100, so the logits of prompt and
    padding positions (most of a batch, at vocabularies of ~50k) are never materialised; with a
    plain linear head the loss is fused with it (kernels/lm_loss.py) and no logits are kept for backward.
    """

    def __init__(self, model: nn.Module, fused_loss: str = "auto"):
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss  # trainer.fused_loss: Liger's kernel where it runs (gpu_training.py)
        self.train(model.training)  # a wrapper of an eval model is in eval mode (evaluate_loss restores it)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cu_seq_lens: torch.Tensor | None = None, **_: torch.Tensor) -> LossOutput:
        # Packed rows (packing.py) come without attention_mask, with restarting position_ids and
        # their sample boundaries (cu_seq_lens) for varlen attention.
        next_labels = labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
        mask = next_labels != IGNORE_INDEX  # (B, T-1)
        if uses_virtual_tokens(self.model):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, P+T, V)
            logits = logits[:, -input_ids.shape[1] : -1][mask]  # drop virtual-token positions
        else:
            hidden = hidden_states(self.model, input_ids, attention_mask, position_ids, cu_seq_lens)[:, :-1]
            _, lm_head = causal_lm_parts(self.model)
            if type(lm_head) is nn.Linear and self.training and liger_loss_applies(self.fused_loss, hidden.device):
                loss_sum = liger_linear_cross_entropy(hidden[mask], lm_head, next_labels[mask])
                return self._output(loss_sum, next_labels.new_zeros(()), mask)
            if type(lm_head) is nn.Linear:  # a plain head (not adapted): the fused loss
                loss_sum, correct = linear_cross_entropy(hidden[mask], lm_head, next_labels[mask],
                                                         want_correct=not self.training)
                return self._output(loss_sum, correct, mask)
            logits = lm_head(hidden[mask])  # (N, V), N = target tokens
        targets = next_labels[mask]  # (N,)
        logits = logits.float()
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        # Token accuracy is an evaluation figure; training skips its pass over the vocabulary.
        correct = targets.new_zeros(()) if self.training else (logits.argmax(dim=-1) == targets).sum()
        return self._output(loss_sum, correct, mask)

    def _output(self, loss_sum: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> LossOutput:
        penalty = adapter_penalty(self.model) if self.training else None
        if penalty is not None:  # AdaLoRA: once per step after fit() divides by the window's target tokens
            loss_sum = loss_sum + penalty * mask.sum()
        return LossOutput(loss_sum=loss_sum, count=mask.sum(), correct=correct)


@torch.no_grad()
def evaluate_loss(objective: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  accelerator: Accelerator | None = None) -> dict[str, float]:
    """Mean loss per target token over `examples`, with perplexity and teacher-forced token accuracy.

    With an accelerator, each process scores its shard and the sums are reduced across processes.
    """
    was_training = objective.training
    objective.eval()
    device = accelerator.device if accelerator else next(objective.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, count, correct
    shard = list(range(rank, len(examples), world))
    for start in range(0, len(shard), batch_size):
        batch = collate_training([examples[i] for i in shard[start : start + batch_size]], pad_id)
        out: LossOutput = objective(**{k: v.to(device) for k, v in batch.items()})
        totals += torch.stack([out.loss_sum.double(), out.count.double(), out.correct.double()])
    if accelerator:
        totals = accelerator.reduce(totals, reduction="sum")
    objective.train(was_training)
    count = totals[1].clamp(min=1)
    loss = (totals[0] / count).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": (totals[2] / count).item()}
