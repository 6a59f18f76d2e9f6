"""The fused LM-head cross-entropy equals lm_head + F.cross_entropy: loss, gradients, accuracy.

Tolerance: fp32; losses to 1e-4 relative, gradients to 1e-5 absolute (summation order only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packing import lora_objective, random_examples

from tunewright.data import collate_training
from tunewright.kernels import lm_loss
from tunewright.kernels.lm_loss import linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_equals_the_plain_loss(monkeypatch, bias: bool, train_head: bool) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 50 * 8)  # 8 rows per chunk: 37 rows in 5 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    loss, correct = linear_cross_entropy(hidden, head, targets, want_correct=True)
    (0.5 * loss).backward()  # a scaled loss, as fit() scales by the window's target tokens
    fused = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters() if p.requires_grad]
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    (0.5 * expected).backward()
    plain = [hidden.grad] + [p.grad for p in head.parameters() if p.requires_grad]

    assert torch.allclose(loss, expected, rtol=1e-4)
    assert correct.item() == (logits.argmax(dim=-1) == targets).sum().item()
    for ours, theirs in zip(fused, plain, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_under_bf16_autocast_casts_the_head_once(monkeypatch, train_head: bool) -> None:
    """Same values as autocast's own casts (bf16 matmuls, fp32 loss), with one cast of the head."""
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 50 * 8)  # 5 chunks: autocast alone would cast 10 times
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    casts = []
    original_to = torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if tensor is head.weight:
            casts.append(args)
        return original_to(tensor, *args, **kwargs)

    with monkeypatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
        patch.setattr(torch.Tensor, "to", counting_to)
        loss, _ = linear_cross_entropy(hidden, head, targets, want_correct=False)
    loss.backward()
    assert casts == [(torch.bfloat16,)]
    assert loss.dtype == torch.float32 and (head.weight.grad is not None) == train_head
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)
    expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-3)
    assert torch.allclose(fused_grad, hidden.grad, atol=2e-2)


def test_fused_loss_without_gradients_and_without_targets() -> None:
    head = torch.nn.Linear(8, 20, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():  # the head's weight requires grad, as in full fine-tuning: no gradient work
        loss, _ = linear_cross_entropy(hidden, head, targets, want_correct=False)
    assert torch.allclose(loss, F.cross_entropy(head(hidden), targets, reduction="sum"), rtol=1e-4)
    empty, correct = linear_cross_entropy(torch.randn(0, 8, requires_grad=True), head, targets[:0], True)
    assert empty.item() == 0.0 and correct.item() == 0


def test_objective_loss_and_gradients_equal_the_unfused_path(tiny_model, monkeypatch) -> None:
    objective = lora_objective(tiny_model)
    batch = collate_training(random_examples(), pad_id=0)

    def run() -> tuple[float, list[torch.Tensor]]:
        objective.zero_grad()
        out = objective(**batch)
        out.loss_sum.backward()
        return out.loss_sum.item(), [p.grad.clone() for p in objective.parameters() if p.requires_grad]

    fused_loss, fused_grads = run()
    import tunewright.objective as objective_module

    def unfused(hidden, head, targets, want_correct):  # noqa: ANN001, ANN202
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum"), targets.new_zeros(())

    monkeypatch.setattr(objective_module, "linear_cross_entropy", unfused)
    plain_loss, plain_grads = run()
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    for ours, theirs in zip(fused_grads, plain_grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
