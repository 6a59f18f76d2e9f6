"""Preference losses, per pair (or per KTO row): pure functions of summed response log-probs.

Each returns `PairLosses`: the per-sample losses and the implicit rewards that the reward accuracy
and margin are measured on. Formulas follow the papers and match TRL 1.16 (tests/test_preference_trl.py):

- DPO (Rafailov et al. 2023): -log σ(β((πc − ρc) − (πr − ρr))), with π, ρ the policy's and the
  reference's summed log-probs of the chosen (c) and rejected (r) responses;
- IPO (Azar et al. 2023): ((πc − ρc)/|c| − (πr − ρr)/|r| − 1/(2β))², per-token averages as in TRL;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 − β((πc − ρc) − (πr − ρr)));
- SimPO (Meng et al. 2024): -log σ(β πc/|c| − β πr/|r| − γ), no reference;
- ORPO (Hong et al. 2024): the chosen NLL − λ log σ(log odds(c) − log odds(r)), odds from the
  per-token average log-probs, no reference;
- KTO (Ethayarajh et al. 2024): 1 − σ(β(log-ratio − z)) for desirable rows, 1 − σ(β(z − log-ratio))
  for undesirable ones, z the clamped, detached KL estimate from mismatched pairs of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLosses:
    losses: torch.Tensor  # (N,) one loss per pair (KTO: per row)
    chosen_rewards: torch.Tensor  # (N,) detached implicit rewards (KTO: of the row's completion)
    rejected_rewards: torch.Tensor  # (N,) detached; KTO: zeros


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, loss_type: str,
               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> PairLosses:
    """DPO and its IPO / hinge variants; all inputs (N,), log-probs summed over response tokens."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # Per-token averages, as IPO's authors and TRL do: the squared loss would otherwise grow with length.
        average_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (average_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, beta: float, gamma: float) -> PairLosses:
    """SimPO: length-normalised log-probs as rewards, with a target margin gamma."""
    chosen_rewards = beta * policy_chosen / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PairLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def orpo_losses(average_chosen: torch.Tensor, average_rejected: torch.Tensor, chosen_nll: torch.Tensor,
                weight: float) -> PairLosses:
    """ORPO per pair: the chosen response's NLL minus `weight` times log σ(log odds ratio).

    `average_*` are per-token average log-probs (N,); `chosen_nll` (N,) is each pair's share of the
    NLL term (the caller decides its normalisation). Rewards are weight × average log-probs (TRL's).
    """
    log_odds = (average_chosen - average_rejected) - (log1mexp(average_chosen) - log1mexp(average_rejected))
    losses = chosen_nll - weight * F.logsigmoid(log_odds)
    return PairLosses(losses, weight * average_chosen.detach(), weight * average_rejected.detach())


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               beta: float, desirable_weight: float, undesirable_weight: float) -> PairLosses:
    """KTO per row: `policy`, `reference` (N,) summed log-probs of each row's completion, `desirable` (N,) bool,
    `kl` the detached, clamped KL estimate (scalar)."""
    ratio = policy - reference
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return PairLosses(losses, beta * ratio.detach(), torch.zeros_like(ratio))
