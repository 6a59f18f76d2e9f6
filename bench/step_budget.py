"""Where a tunewright training step's time goes: wall-clock timers around each replaced piece, in `fit`.

The same model, data and settings as `train_speed.py`'s tunewright run (SmolLM2-135M, LoRA r=8 on
q/v, 4 samples per step, packing). Timers wrap the span attention (forward, backward), the fused
LM-head loss and the RMSNorm function (forward, backward), from the second optimizer step on.
A second run trains on the last 6 tokens of every sample: what a step costs that does not shrink
with tokens (operator calls, reading the weights, the optimizer). `torch.profiler` is not used: it
inflates big memory-bound operators several times over on this kind of machine.

    .venv/bin/python bench/step_budget.py --precision bf16 --out bench/results/step_budget_zen5_bf16.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_json  # noqa: E402
from train_speed import BATCH_SIZE, LEARNING_RATE, SEED, load_model_and_examples, lora_config  # noqa: E402

from tunewright.kernels import attention, cpu_training, lm_loss  # noqa: E402

PIECES = {
    "attention_forward": (attention._BF16SpanAttention, "forward"),
    "attention_backward": (attention._BF16SpanAttention, "backward"),
    "lm_loss_forward_and_gradient": (lm_loss._LinearCrossEntropy, "forward"),
    "rms_norm_forward": (cpu_training._FrozenRMSNorm, "forward"),
    "rms_norm_backward": (cpu_training._FrozenRMSNorm, "backward"),
}


def timed(function: Callable[..., Any], seconds: defaultdict[str, float], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
    return staticmethod(wrapper)  # type: ignore[return-value]


def train_and_time(model: Any, tokenizer: Any, examples: list[Any], steps: int, precision: str) -> dict[str, Any]:
    from accelerate import Accelerator

    from tunewright.config import TrainerConfig
    from tunewright.objective import LanguageModelObjective
    from tunewright.train import fit

    seconds: defaultdict[str, float] = defaultdict(float)
    stamps: list[float] = []
    originals = {name: getattr(owner, method) for name, (owner, method) in PIECES.items()}

    def on_log(_record: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            seconds.clear()  # the first step warms kernels and allocators up

    cfg = TrainerConfig(epochs=1, max_steps=steps, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                        lr_scheduler="constant", max_grad_norm=1.0, seed=SEED, packing=True, precision=precision)
    try:
        for name, (owner, method) in PIECES.items():
            setattr(owner, method, timed(originals[name], seconds, name))
        fit(LanguageModelObjective(model), examples, [], cfg, Accelerator(cpu=True), tokenizer.pad_token_id,
            on_log=on_log, show_progress=False)
    finally:
        for name, (owner, method) in PIECES.items():
            setattr(owner, method, staticmethod(originals[name]))
    timed_steps = len(stamps) - 1
    step_ms = 1000 * (stamps[-1] - stamps[0]) / timed_steps
    pieces = {name: 1000 * seconds[name] / timed_steps for name in PIECES}
    return {"step_ms": step_ms, "pieces_ms": pieces,
            "pieces_fraction": {name: ms / step_ms for name, ms in pieces.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from peft import get_peft_model

    model, tokenizer, examples = load_model_and_examples()
    torch.manual_seed(SEED)
    model = get_peft_model(model, lora_config())
    full = train_and_time(model, tokenizer, examples, args.steps, args.precision)
    short_examples = []
    for example in examples:
        short = copy.copy(example)
        short.input_ids, short.labels = example.input_ids[-6:], example.labels[-6:]
        short_examples.append(short)
    short_run = train_and_time(model, tokenizer, short_examples, args.steps, args.precision)
    result = {"precision": args.precision, "steps": args.steps, "full_samples": full,
              "six_token_samples": short_run,
              "fixed_fraction": short_run["step_ms"] / full["step_ms"]}
    print(f"step {full['step_ms']:.0f} ms; 6-token samples {short_run['step_ms']:.0f} ms")
    for name, ms in full["pieces_ms"].items():
        print(f"  {name:30s} {ms:7.1f} ms  {100 * full['pieces_fraction'][name]:5.1f}%")
    save_json(result, args.out)


if __name__ == "__main__":
    main()
