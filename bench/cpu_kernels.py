"""The CPU training pieces tunewright replaces, each side by side with what it replaces, in one run.

Forward + backward wall time (median of alternating rounds), at the shapes of the SmolLM2-135M
training benchmark (`train_speed.py`: four samples of 62-150 tokens packed into one 447-token row,
9 query heads and 3 key/value heads of 64, hidden size 576, 49,152-token vocabulary):

- `attention`: `attention._BF16SpanAttention` against PyTorch's flash-attention SDPA per span in
  fp32 and in bf16, plus each one's relative error against fp64 (output, dq, dk, dv);
- `rms_norm`: `kernels.cpu_training._FrozenRMSNorm` against transformers' LlamaRMSNorm module (bf16, frozen weight);
- `dropout`: `kernels.cpu_training.FastDropout` (a 0/1 factor) against the same mask applied with `masked_fill`;
- `lm_loss`: the fused LM-head loss (`lm_loss.linear_cross_entropy`, 300 target rows) against
  `lm_head` + `F.cross_entropy` under bf16 autocast;
- `training_linears` (fp32 training): every frozen linear layer of SmolLM2-135M at 480 rows (a
  micro-batch), forward and input gradient, through `onednn_training.onednn_frozen_linears`
  (column-major weights, through autograd as in `fit`) against autograd's `F.linear` (MKL), with
  the relative error of the input gradient against fp64;
- `decode_linears` (generation, forward only): every linear layer of SmolLM2-135M (30 x 7 and
  the LM head, each weight read from memory) at the 16 rows of a decode step, through
  `prepacked.prepacked_linears` against `F.linear`, in fp32 (with each one's relative error
  against fp64) and, on a CPU with bf16 units, in bf16 (with whether the bits are equal).

    .venv/bin/python bench/cpu_kernels.py --out bench/results/cpu_kernels_zen5.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_json  # noqa: E402

from tunewright.kernels.attention import _BF16SpanAttention  # noqa: E402
from tunewright.kernels.cpu_training import (
    MASK_LEVELS,
    FastDropout,
    _FrozenRMSNorm,
    dropped_positions,
    reuse_freed_memory,
)
from tunewright.kernels.lm_loss import linear_cross_entropy  # noqa: E402
from tunewright.kernels.onednn_training import onednn_frozen_linears  # noqa: E402
from tunewright.kernels.prepacked import packable, prepacked_linears  # noqa: E402

SPANS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, TARGET_ROWS = [62, 140, 95, 150], 9, 3, 64, 576, 49152, 300
LAYERS, KV_WIDTH, MLP_WIDTH, DECODE_ROWS, TRAINING_ROWS = 30, 192, 1536, 16, 480
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV_WIDTH), (HIDDEN, KV_WIDTH), (HIDDEN, HIDDEN),
                (HIDDEN, MLP_WIDTH), (HIDDEN, MLP_WIDTH), (MLP_WIDTH, HIDDEN)]  # (in, out) per layer
Step = Callable[[], Any]


def median_ms(contenders: dict[str, Step], rounds: int, repeats: int = 10) -> dict[str, float]:
    """Median milliseconds of each contender, rounds alternating in order, after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in contenders.values():
        step()
    for round_index in range(rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in order:
            for _ in range(repeats):
                started = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def forward_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> Step:
    """One forward + backward call: returns the output and the inputs' gradients."""
    def step() -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves]
    return step


def per_span_sdpa(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        pieces = [F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
                  for q, k, v in zip(*(torch.split(t.to(dtype), SPANS, dim=2) for t in (query, key, value)),
                                     strict=True)]
        return torch.cat(pieces, dim=1)
    return attend


def attention(rounds: int) -> dict[str, Any]:
    width = sum(SPANS)
    # The layout inside the model: projections give (1, W, heads, D), attention sees it transposed.
    inputs = [(torch.randn(1, width, heads, HEAD_DIM) * 1.5).to(torch.bfloat16).transpose(1, 2)
              for heads in (HEADS, KV_HEADS, KV_HEADS)]
    grad = torch.randn(1, width, HEADS, HEAD_DIM)
    contenders = {
        "tunewright_span_bf16": lambda q, k, v: _BF16SpanAttention.apply(q, k, v, SPANS, HEAD_DIM**-0.5),
        "sdpa_flash_fp32": per_span_sdpa(torch.float32),
        "sdpa_flash_bf16": per_span_sdpa(torch.bfloat16),
    }
    exact = forward_backward(per_span_sdpa(torch.float64), inputs, grad)()
    errors = {name: [((a.double() - b).norm() / b.norm()).item()
                     for a, b in zip(forward_backward(fn, inputs, grad)(), exact, strict=True)]
              for name, fn in contenders.items()}
    ms = median_ms({name: forward_backward(fn, inputs, grad) for name, fn in contenders.items()}, rounds)
    return {"ms": ms, "relative_error_out_dq_dk_dv": errors,
            "speedup_vs_sdpa_flash_fp32": ms["sdpa_flash_fp32"] / ms["tunewright_span_bf16"]}


def rms_norm(rounds: int) -> dict[str, Any]:
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, sum(SPANS), HIDDEN).to(torch.bfloat16) * 3
    grad = torch.randn_like(x)
    ms = median_ms({"tunewright_frozen_rms_norm": forward_backward(
                        lambda t: _FrozenRMSNorm.apply(t, norm.weight, norm.variance_epsilon), [x], grad),
                    "transformers_module": forward_backward(norm, [x], grad)}, rounds)
    return {"ms": ms, "speedup": ms["transformers_module"] / ms["tunewright_frozen_rms_norm"]}


def dropout(rounds: int) -> dict[str, Any]:
    p = 0.05
    scale = MASK_LEVELS / (MASK_LEVELS - round(p * MASK_LEVELS))
    x = torch.randn(1, sum(SPANS), HIDDEN).to(torch.bfloat16)
    grad = torch.randn_like(x)
    fast = FastDropout(p).train()
    ms = median_ms({"tunewright_0_1_factor": forward_backward(fast, [x], grad),
                    "masked_fill": forward_backward(
                        lambda t: (t * scale).masked_fill(dropped_positions(t.shape, p), 0.0), [x], grad)}, rounds)
    return {"ms": ms, "speedup": ms["masked_fill"] / ms["tunewright_0_1_factor"]}


def lm_loss(rounds: int) -> dict[str, Any]:
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    head.weight.data = (head.weight.data * 0.5).to(torch.bfloat16)
    hidden = torch.randn(TARGET_ROWS, HIDDEN).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (TARGET_ROWS,))

    def fused(h: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, head, targets, want_correct=False)[0]

    def plain(h: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(head(h).float(), targets, reduction="sum")

    one = torch.ones(())
    ms = median_ms({"tunewright_fused": forward_backward(fused, [hidden], one),
                    "lm_head_plus_cross_entropy": forward_backward(plain, [hidden], one)}, rounds, repeats=3)
    return {"ms": ms, "speedup": ms["lm_head_plus_cross_entropy"] / ms["tunewright_fused"]}


def decode_linears_at(model: torch.nn.ModuleList, rounds: int) -> dict[str, Any]:
    """Every layer of `model` once, at DECODE_ROWS rows: prepacked against F.linear."""
    dtype = model[0].weight.dtype
    inputs = {width: torch.randn(DECODE_ROWS, width).to(dtype) for width in (HIDDEN, MLP_WIDTH)}

    def plain() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [layer(inputs[layer.in_features]) for layer in model]

    def packed() -> list[torch.Tensor]:
        with prepacked_linears(model):
            return plain()

    ms = median_ms({"tunewright_prepacked": packed, "f_linear": plain}, rounds, repeats=3)
    entry: dict[str, Any] = {"ms": ms, "speedup": ms["f_linear"] / ms["tunewright_prepacked"]}
    ours, theirs = packed(), plain()
    if dtype != torch.float32:
        entry["bits_equal"] = all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        return entry
    exact = [inputs[layer.in_features].double() @ layer.weight.double().T for layer in model]

    def error(outputs: list[torch.Tensor]) -> float:
        return max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outputs, exact, strict=True))

    entry["relative_error_vs_fp64"] = {"tunewright_prepacked": error(ours), "f_linear": error(theirs)}
    return entry


def training_linears(rounds: int) -> dict[str, Any]:
    model = torch.nn.ModuleList([torch.nn.Linear(i, o, bias=False) for i, o in LAYER_SHAPES * LAYERS]
                                ).requires_grad_(False)
    inputs = [torch.randn(TRAINING_ROWS, layer.in_features) for layer in model]
    grads = [torch.randn(TRAINING_ROWS, layer.out_features) for layer in model]

    def autograd_step(layers: torch.nn.ModuleList = model) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in inputs]
        torch.autograd.backward([layer(x) for layer, x in zip(layers, leaves, strict=True)], grads)
        return [leaf.grad for leaf in leaves]

    ours_model = copy.deepcopy(model)  # re-laid out once for the whole measurement, as in fit

    def ours() -> list[torch.Tensor]:
        return autograd_step(ours_model)

    exact = [g.double() @ layer.weight.double() for layer, g in zip(model, grads, strict=True)]

    def error(outputs: list[torch.Tensor]) -> float:
        return max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outputs, exact, strict=True))

    with onednn_frozen_linears(ours_model):
        ms = median_ms({"tunewright_onednn": ours, "f_linear_mkl": autograd_step}, rounds, repeats=2)
        ours_error = error(ours())
    return {"ms": ms, "speedup_vs_mkl": ms["f_linear_mkl"] / ms["tunewright_onednn"],
            "input_gradient_relative_error_vs_fp64": {"tunewright_onednn": ours_error,
                                                      "f_linear_mkl": error(autograd_step())}}


def decode_linears(rounds: int) -> dict[str, Any]:
    model = torch.nn.ModuleList([torch.nn.Linear(i, o, bias=False) for i, o in LAYER_SHAPES * LAYERS]
                                + [torch.nn.Linear(HIDDEN, VOCAB, bias=False)]).requires_grad_(False)
    result = {"fp32": decode_linears_at(model, rounds)}
    if packable(model[0].weight.to(torch.bfloat16)):  # a CPU with bf16 units
        result["bf16"] = decode_linears_at(model.to(torch.bfloat16), rounds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pieces = {"attention": attention, "rms_norm": rms_norm, "dropout": dropout, "lm_loss": lm_loss,
              "training_linears": training_linears, "decode_linears": decode_linears}
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pieces", nargs="+", choices=list(pieces), default=list(pieces),
                        help="the first four are bf16 pieces: hours on a CPU without bf16 units")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with reuse_freed_memory():  # as in training (fit enters it on CPU)
        result = {name: pieces[name](args.rounds) for name in args.pieces}
    for name, figures in result.items():
        print(name, {key: (round(value, 3) if isinstance(value, float) else value) for key, value in figures.items()})
    save_json(result, args.out)


if __name__ == "__main__":
    main()
