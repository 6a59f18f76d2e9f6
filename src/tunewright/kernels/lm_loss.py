"""Cross-entropy through the LM head without keeping the (targets x vocabulary) logits for backward.

The plain path (`lm_head(h)`, `cross_entropy`) stores the logits, runs log-softmax over them,
and in the backward pass runs log-softmax's backward and a zero-filled scatter over them again:
at SmolLM2's 49k vocabulary that is several passes over a ~50 MB tensor per micro-batch. Here
each chunk of target rows goes forward once: logits, one fused softmax, and at once the gradient
softmax - one_hot, multiplied back to the hidden size. Only that (N, H) gradient is kept, and
the backward pass just scales it. The chunks bound the memory at CHUNK_ELEMENTS logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunewright.kernels.onednn_training import Matmul, onednn_matmuls

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in fp32)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor,
                want_grad: bool, want_correct: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss sum, d loss_sum / d logits if wanted, correct argmax count) of one chunk's (n, V) logits."""
    # One fused kernel reads the logits once and writes fp32 probabilities, instead of separate
    # passes for upcast, shift, exp, sum and divide over the (n, V) tensor.
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_logits, top_index = logits.max(dim=-1)
    correct = (top_index == targets).sum() if want_correct else targets.new_zeros(())
    # log-sum-exp = top logit - log p(top token): p(top) >= 1 / V never underflows, unlike p(target).
    log_sum_exp = top_logits.float() - probabilities.gather(1, top_index[:, None]).squeeze(1).log()
    target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
    loss = (log_sum_exp - target_logits).sum()
    if not want_grad:
        return loss, None, correct
    probabilities[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, probabilities, correct


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, want_correct: bool, grad_enabled: bool,
                onednn: tuple[Matmul, Matmul] | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Under no_grad a trained head's weight still "needs" a gradient: skip it (evaluation).
        need_hidden, need_weight = (grad_enabled and flag for flag in ctx.needs_input_grad[:2])
        need_bias = bias is not None and grad_enabled and ctx.needs_input_grad[2]
        want_grad = need_hidden or need_weight or need_bias
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast the head once for all matmuls below; autocast would cast it for each of them
            # (a 49k x 576 head: 11 ms per cast on 2 CPU cores). Same values either way.
            weight = weight.to(torch.get_autocast_dtype(device_type))
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start : start + rows]
            # (n, V) in the autocast dtype if any; onednn: the same fp32 product (onednn_training.py)
            logits = F.linear(chunk, weight, bias) if onednn is None else _with_bias(onednn[0](chunk), bias)
            loss, grad_logits, chunk_correct = _chunk_loss(logits, targets[start : start + rows],
                                                           want_grad, want_correct)
            loss_sum += loss
            correct += chunk_correct
            if grad_logits is None:
                continue
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = (grad_logits.to(weight.dtype) @ weight if onednn is None
                                                     else onednn[1](grad_logits))
            if grad_weight is not None:
                grad_weight += grad_logits.T @ chunk.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.hidden_dtype, ctx.weight_dtype

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if grad is None else (grad * grad_loss).to(dtype)

        return (scaled(grad_hidden, hidden_dtype), scaled(grad_weight, weight_dtype),
                scaled(grad_bias, weight_dtype), None, None, None, None)


def _with_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits if bias is None else logits.add_(bias)


def linear_cross_entropy(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                         want_correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, correct argmax count) of `lm_head(hidden)` against `targets`.

    hidden (N, H), targets (N,). The loss is computed in fp32 whatever the weights' dtype.
    """
    loss_sum, correct = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
        hidden, lm_head.weight, lm_head.bias, targets, want_correct, torch.is_grad_enabled(),
        onednn_matmuls(lm_head, hidden))
    return loss_sum, correct
