"""Where greedy generation's time goes on this machine: prefill, and one decode step per batch size.

Measures, on smollm2-135m (fp32) with the same 16 Alpaca prompts as bench/generate_speed.py:
- the prefill of the 16 left-padded prompts (seconds, and GFLOP/s against the fp32 matmul limit);
- one decode step (one new token per row against the KV cache) at batch sizes 1 to 16: the
  median of 8 steps, and the weight-read rate it implies (every step reads all the weights);
- where a decode step's time goes at batch 1 and 16 (profiler self time: matmuls, KV-cache cat,
  attention);
- the machine's memory read bandwidth (summing a 1 GiB fp32 tensor) and fp32 matmul limit;
- tunewright's own pieces, on its packed weights (`kernels/prepacked.py`): the prefill padded and packed
  (`generate.packed_prefill`, alternating), a decode step at 16 rows, and that step's linear layers
  alone; the floor of tunewright's run is its packed prefill + 31 steps of nothing but the linears.

Together they give the floor of a 32-token batched run and show how far the kernels are from it.
`--dtype bfloat16` profiles the model with bf16 weights against the bf16 matmul limit.

    .venv/bin/python bench/decode_profile.py --out bench/results/decode_profile_avx2_fp32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from tunewright.config import BackendConfig
from tunewright.data import collate_prompts, encode_prompts
from tunewright.generate import packed_prefill, prompt_positions
from tunewright.kernels.prepacked import prepacked_linears
from tunewright.model import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import alpaca_prompts  # noqa: E402
from matmul_limit import measure  # noqa: E402
from report import save_json  # noqa: E402

BATCH_SIZES = [1, 2, 4, 8, 12, 13, 14, 15, 16]


def read_bandwidth_gb_s(gib: int = 1, repeats: int = 5) -> float:
    data = torch.ones(gib * 2**30 // 4)
    data.sum()
    started = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return repeats * data.numel() * 4 / 1e9 / (time.perf_counter() - started)


def decode_steps(model, batch: dict[str, torch.Tensor]) -> Iterator[float]:
    """Prefill `batch`, then one greedy decode step per `next()`: yields the seconds of its forward."""
    mask = batch["attention_mask"]
    positions = prompt_positions(mask)
    output = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1)
    cache, next_positions = output.cache, positions[:, -1:] + 1
    while True:
        tokens = output.logits[:, -1].argmax(dim=-1)
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        started = time.perf_counter()
        output = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_positions, cache=cache,
                       use_cache=True)
        yield time.perf_counter() - started
        next_positions = next_positions + 1


@torch.inference_mode()
def decode_step_seconds(model, batch: dict[str, torch.Tensor], steps: int = 8) -> float:
    stepper = decode_steps(model, batch)
    return statistics.median(next(stepper) for _ in range(steps))


@torch.inference_mode()
def decode_step_breakdown_ms(model, batch: dict[str, torch.Tensor], steps: int = 8) -> dict[str, float]:
    """Self time per decode step of the operators that take it (torch.profiler), after 3 warm-up steps.

    The profiler's own cost inflates the total a little; the matmul figure is the one to read.
    """
    from torch.profiler import ProfilerActivity, profile

    stepper = decode_steps(model, batch)
    for _ in range(3):
        next(stepper)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            next(stepper)
    events = profiler.key_averages()
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "kv_cache_cat": ("aten::cat",),
              "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",)}
    breakdown = {name: sum(e.self_cpu_time_total for e in events if e.key in keys) / steps / 1e3
                 for name, keys in groups.items()}
    breakdown["total_profiled"] = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    return breakdown


@torch.inference_mode()
def prefill_seconds(model, batch: dict[str, torch.Tensor], repeats: int = 3) -> float:
    positions = prompt_positions(batch["attention_mask"])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return min(times)


def seconds_of(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


@torch.inference_mode()
def tunewright_budget(model, batch: dict[str, torch.Tensor], rounds: int = 3) -> dict[str, float]:
    """tunewright's generation pieces on its packed weights (medians; the prefills alternate)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with prepacked_linears(model):
        padded = lambda: model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask),  # noqa: E731
                               use_cache=True, logits_to_keep=1)
        packed = lambda: packed_prefill(model, ids, mask)  # noqa: E731
        padded(), packed()  # warm-up
        times = [(seconds_of(padded), seconds_of(packed)) for _ in range(rounds)]
        step = decode_step_seconds(model, batch)
        linears = [module for module in model.modules() if type(module) is nn.Linear]
        inputs = {layer: torch.randn(len(ids), layer.in_features) for layer in linears}
        linears_s = statistics.median(seconds_of(lambda: [layer(inputs[layer]) for layer in linears])
                                      for _ in range(5))
    padded_s, packed_s = (statistics.median(column) for column in zip(*times, strict=True))
    return {"prefill_padded_s": padded_s, "prefill_packed_s": packed_s, "prefill_packed_speedup": padded_s / packed_s,
            "decode_step_ms": step * 1e3, "decode_linears_ms": linears_s * 1e3,
            "decode_other_ms": (step - linears_s) * 1e3, "run_floor_s_32_tokens": packed_s + 31 * linears_s,
            "run_estimate_s_32_tokens": packed_s + 31 * step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_base_model("smollm2-135m", BackendConfig(device="cpu", dtype=args.dtype))
    math = "fp32" if args.dtype == "float32" else "bf16"
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompt_ids = encode_prompts(alpaca_prompts(16), tokenizer, use_chat_template=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    lm_head_params = model.get_output_embeddings().weight.numel()

    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    prefill = prefill_seconds(model, batch)
    padded_tokens = batch["input_ids"].numel()
    prefill_flops = 2 * layer_params * padded_tokens + 2 * lm_head_params * len(prompt_ids)
    steps = {size: decode_step_seconds(model, collate_prompts(prompt_ids[:size], tokenizer.pad_token_id))
             for size in BATCH_SIZES}
    breakdown = {size: decode_step_breakdown_ms(model, collate_prompts(prompt_ids[:size], tokenizer.pad_token_id))
                 for size in (1, 16)}
    ours = tunewright_budget(model, batch)
    bandwidth = read_bandwidth_gb_s()
    matmul = measure(2)

    floor_step = max(weight_bytes / (bandwidth * 1e9),
                     2 * (layer_params + lm_head_params) * 16 / (matmul[f"{math}_gflops"] * 1e9))
    report = {
        "dtype": args.dtype, "weight_mib": weight_bytes / 2**20, "read_bandwidth_gb_s": bandwidth, "matmul": matmul,
        "prefill": {"padded_tokens": padded_tokens, "real_tokens": sum(map(len, prompt_ids)), "seconds": prefill,
                    "gflop_s": prefill_flops / prefill / 1e9,
                    f"fraction_of_{math}_matmul_limit": prefill_flops / prefill / 1e9 / matmul[f"{math}_gflops"]},
        "decode_step_ms": {size: seconds * 1e3 for size, seconds in steps.items()},
        "decode_weight_read_gb_s": {size: weight_bytes / seconds / 1e9 for size, seconds in steps.items()},
        "decode_step_profile_ms": breakdown,
        "decode_matmul_gflop_s_batch16": 2 * (layer_params + lm_head_params) * 16 / breakdown[16]["matmul"] / 1e6,
        "decode_step_floor_ms_batch16": floor_step * 1e3,
        "run_floor_s_32_tokens": prefill + 31 * floor_step,
        "run_measured_kernels_s_32_tokens": prefill + 31 * steps[16],
        "tunewright": ours,
    }
    print(json.dumps(report, indent=1))
    save_json(report, args.out)


if __name__ == "__main__":
    main()
