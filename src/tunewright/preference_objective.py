"""The preference objective: the policy plus a DPO/IPO/hinge, SimPO, ORPO or KTO loss in one nn.Module.

Chosen and rejected sequences go through the model in one batch (rows 0..B−1 chosen, B..2B−1
rejected), and the LM head runs only at response positions. Reference log-probs come from the
batch (the cache, reference_cache.py) or from a `Reference` pass under no_grad.

fit() normalises the summed per-pair losses by the pairs of the optimizer step (`PreferenceBatching`),
so the step loss is the mean over pairs, as in TRL; accumulation does not change it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from tunewright.config import PreferenceConfig
from tunewright.data import IGNORE_INDEX
from tunewright.errors import ConfigError
from tunewright.objective import LossOutput, causal_lm_parts, hidden_states
from tunewright.preference_data import PreferenceExample, pair_rows
from tunewright.preference_loss import PairLosses, dpo_losses, kto_losses, orpo_losses, simpo_losses
from tunewright.shared_prompt import collate_shared_prompt, shared_prompt_log_probs

STAT_NAMES = ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")
REFERENCE_TRAINERS = ("dpo", "kto")


@dataclass
class PreferenceLossOutput(LossOutput):
    stats: torch.Tensor | None = None  # (5,) pairs, correct, margin sum, chosen logps sum, rejected logps sum


class Reference:
    """Where reference log-probs come from: the policy with its adapter disabled, or a frozen model."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model  # None: the policy itself, inside peft's disable_adapter()

    def context(self, policy: nn.Module) -> AbstractContextManager[None]:
        if self.model is not None:
            return nullcontext()
        if not hasattr(policy, "disable_adapter"):  # a merged or fully fine-tuned model has no base to fall back to
            raise ConfigError("preference.reference: this model has no adapter to disable; set preference.reference "
                              "to the reference run or model folder")
        return policy.disable_adapter()

    @torch.no_grad()
    def log_probs(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model = policy if self.model is None else self.model
        with self.context(policy), evaluation_mode(model):
            return row_log_probs(model, batch)[:2]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def row_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, tokens, nll), each (2B,): chosen sequences then rejected ones, from either batch layout."""
    if "predictor" in batch:
        return shared_prompt_log_probs(model, **batch)
    return sequence_log_probs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (summed response log-probs (R,), response tokens (R,), summed NLL (R,)); logits only at targets."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]  # (R, T-1, H)
    next_labels = labels[:, 1:]  # (R, T-1)
    mask = next_labels != IGNORE_INDEX
    _, lm_head = causal_lm_parts(model)
    logits = lm_head(hidden[mask]).float()  # (N, V), N = response tokens of all rows
    token_logps = -F.cross_entropy(logits, next_labels[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, mask.sum(dim=1), -logps


def collate_pairs(examples: Sequence[PreferenceExample], pad_id: int, kto: bool = False,
                  shared: bool = True) -> dict[str, torch.Tensor]:
    """Pairs read with their prompt once (shared_prompt.py), or (`shared` false, and always for KTO) right-padded
    (2B, T) rows: chosen then rejected (KTO: completions then KL rows), labels −100 off the responses."""
    if shared and not kto:
        batch = collate_shared_prompt(examples, pad_id)
        if all(example.reference_logps is not None for example in examples):
            batch["reference_logps"] = torch.tensor([e.reference_logps for e in examples], dtype=torch.float32)
        return batch
    rows = pair_rows(examples, kto)
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if all(example.reference_logps is not None for example in examples):
        batch["reference_logps"] = torch.tensor([e.reference_logps for e in examples], dtype=torch.float32)  # (B, 2)
    if kto:
        batch["desirable"] = torch.tensor([bool(example.desirable) for example in examples])
    return batch


class PreferenceObjective(nn.Module):
    """`forward(**collate_pairs(...))` -> summed per-pair losses, the pair count and the reward statistics."""

    def __init__(self, model: nn.Module, trainer_type: str, settings: PreferenceConfig,
                 reference: Reference | None = None):
        super().__init__()
        self.model = model
        self.trainer_type = trainer_type
        self.settings = settings
        self.reference = reference if trainer_type in REFERENCE_TRAINERS else None
        self.step_stats = torch.zeros(5, dtype=torch.float64)  # summed over an optimizer step (training)
        self.train(model.training)

    def forward(self, reference_logps: torch.Tensor | None = None, desirable: torch.Tensor | None = None,
                **batch: torch.Tensor) -> PreferenceLossOutput:
        rows = batch["input_ids"].shape[0]
        pairs = rows if "predictor" in batch else rows // 2  # one row per pair when the prompt is shared
        if self.trainer_type == "kto":
            result = self._kto(batch, pairs, reference_logps, desirable)
        else:
            result = self._paired(batch, pairs, reference_logps)
        losses, policy_logps = result
        stats = torch.stack([
            torch.tensor(float(pairs), dtype=torch.float64),
            (losses.chosen_rewards > losses.rejected_rewards).sum().double().cpu(),
            (losses.chosen_rewards - losses.rejected_rewards).sum().double().cpu(),
            policy_logps[0].detach().sum().double().cpu(),
            policy_logps[1].detach().sum().double().cpu(),
        ])
        if self.training:
            self.step_stats += stats
        return PreferenceLossOutput(loss_sum=losses.losses.sum(), count=torch.tensor(pairs),
                                    correct=stats[1], stats=stats)

    def _reference(self, batch: dict[str, torch.Tensor], pairs: int,
                   cached: torch.Tensor | None) -> torch.Tensor:
        """(2B,) reference log-probs of the batch rows, from the cache or a reference pass."""
        if cached is not None:
            return cached.to(batch["input_ids"].device).T.reshape(-1)  # (B, 2) -> chosen rows then rejected rows
        assert self.reference is not None, "a reference trainer needs a Reference or cached log-probs"
        return self.reference.log_probs(self.model, batch)[0]

    def _paired(self, batch: dict[str, torch.Tensor], pairs: int, cached: torch.Tensor | None
                ) -> tuple[PairLosses, tuple[torch.Tensor, torch.Tensor]]:
        logps, tokens, nll = row_log_probs(self.model, batch)
        chosen, rejected = logps[:pairs], logps[pairs:]
        chosen_tokens, rejected_tokens = tokens[:pairs], tokens[pairs:]
        settings = self.settings
        if self.trainer_type == "dpo":
            reference = self._reference(batch, pairs, cached)
            losses = dpo_losses(chosen, rejected, reference[:pairs], reference[pairs:], settings.beta,
                                settings.loss_type, chosen_tokens, rejected_tokens)
        elif self.trainer_type == "simpo":
            losses = simpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, settings.beta,
                                  settings.simpo_gamma)
        else:  # orpo: the NLL is the mean over the batch's chosen tokens, shared out per pair
            nll_share = nll[:pairs] * pairs / chosen_tokens.sum().clamp(min=1)
            losses = orpo_losses(chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1),
                                 nll_share, settings.orpo_lambda)
        return losses, (chosen, rejected)

    def _kto(self, batch: dict[str, torch.Tensor], pairs: int, cached: torch.Tensor | None,
             desirable: torch.Tensor | None) -> tuple[PairLosses, tuple[torch.Tensor, torch.Tensor]]:
        first = {key: value[:pairs] for key, value in batch.items()}
        mismatched = {key: value[pairs:] for key, value in batch.items()}
        policy = sequence_log_probs(self.model, **first)[0]
        with torch.no_grad():
            policy_kl = sequence_log_probs(self.model, **mismatched)[0]
        reference = self._reference(batch, pairs, cached)
        kl = (policy_kl - reference[pairs:]).mean().clamp(min=0).detach()
        assert desirable is not None
        settings = self.settings
        losses = kto_losses(policy, reference[:pairs], desirable.to(policy.device), kl, settings.beta,
                            settings.kto_desirable_weight, settings.kto_undesirable_weight)
        # Accuracy for KTO: a desirable row's reward above 0, an undesirable one's below.
        signed = torch.where(desirable.to(policy.device), losses.chosen_rewards, -losses.chosen_rewards)
        desirable_logps = torch.where(desirable.to(policy.device), policy, torch.zeros_like(policy))
        undesirable_logps = torch.where(desirable.to(policy.device), torch.zeros_like(policy), policy)
        return PairLosses(losses.losses, signed, torch.zeros_like(signed)), (desirable_logps, undesirable_logps)

    def take_step_metrics(self) -> dict[str, float]:
        """The reward statistics of the optimizer step just taken (training), then reset."""
        metrics = summarise(self.step_stats)
        self.step_stats = torch.zeros(5, dtype=torch.float64)
        return metrics


def summarise(stats: torch.Tensor) -> dict[str, float]:
    """(pairs, correct, margin, chosen, rejected) sums -> the means reported as metrics."""
    pairs = max(float(stats[0]), 1.0)
    return {name: float(value) / pairs for name, value in zip(STAT_NAMES, stats[1:].tolist(), strict=True)}


@torch.no_grad()
def evaluate_pairs(objective: nn.Module, examples: Sequence[PreferenceExample], batch_size: int, pad_id: int,
                   accelerator: Accelerator | None = None, kto: bool = False) -> dict[str, float]:
    """Mean loss per pair, reward accuracy, mean reward margin and mean chosen/rejected log-probs."""
    with evaluation_mode(objective):
        device = accelerator.device if accelerator else next(objective.parameters()).device
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        totals = torch.zeros(6, dtype=torch.float64)  # loss sum, then the five statistics
        shard = [examples[i] for i in range(rank, len(examples), world)]
        for start in range(0, len(shard), batch_size):
            batch = collate_pairs(shard[start : start + batch_size], pad_id, kto)
            out: PreferenceLossOutput = objective(**{key: value.to(device) for key, value in batch.items()})
            assert out.stats is not None
            totals += torch.cat([out.loss_sum.detach().double().cpu().reshape(1), out.stats])
        if accelerator:
            totals = accelerator.reduce(totals.to(device), reduction="sum").cpu()
    return {"loss": float(totals[0]) / max(float(totals[1]), 1.0), **summarise(totals[1:])}


def pair_count(examples: Sequence[PreferenceExample], indices: Sequence[int]) -> int:
    return len(indices)


Collate = Callable[[Sequence[PreferenceExample], int], dict[str, torch.Tensor]]
