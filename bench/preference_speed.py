"""DPO training speed: tunewright against trl's DPOTrainer, side by side on CPU.

Same model (smollm2-135m, fp32, CPU), same pairs (the first 200 of the shared hh-rlhf harmless
train.jsonl, split into shared prompt + final replies by tunewright and cut to --max-length
tokens, the prompt losing its start), same settings (LoRA r=8, alpha 16, dropout 0.05 on
q_proj/v_proj; batch 4; AdamW at a constant 2e-4; clip 1.0; beta 0.1, sigmoid loss; no gradient
checkpointing, which DPOConfig turns on by default). trl gets
the very prompts tunewright kept (decoded back to text) and the same responses, no truncation.

Methods, each in a fresh subprocess (its own peak RSS), run one after the other:
- `tunewright_uncached`: the reference log-probs in every step (adapter disabled, no grad);
- `tunewright_cache_cold`: the reference pass over all 200 pairs first (counted), then training;
- `tunewright_cache_warm`: the cache already on disk (a later run or a resume): read, then train;
- `trl`: DPOTrainer, reference in every step (its default);
- `trl_precomputed`: DPOTrainer with precompute_ref_log_probs=True (its pass counted); not in the
  default list (on 2 cores its reference pass alone runs for minutes): pass --methods to add it.

Time per optimizer step is taken over steps 2..--steps (step 1 warms up). pairs/s is for one
epoch of the 200 pairs: 200 / (reference pass + 50 steps x time per step), the reference pass
measured over all 200 pairs where a method has one.

    flock /tmp/tunewright-bench.lock .venv/bin/python bench/preference_speed.py --steps 4 --max-length 192 \
        --out bench/results/preference_speed_avx2_fp32.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_json  # noqa: E402

HH_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"
PAIRS, BATCH_SIZE, LEARNING_RATE, BETA = 200, 4, 2e-4, 0.1
METHODS = ["tunewright_uncached", "tunewright_cache_cold", "tunewright_cache_warm", "trl"]


def tunewright_config(max_length: int, cache: bool, steps: int) -> Any:
    from tunewright.config import validate_config

    return validate_config({
        "base_model": "smollm2-135m", "input_features": [{"name": "prompt"}],
        "output_features": [{"name": "chosen"}],
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "trainer": {"type": "dpo", "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "max_steps": steps,
                    "lr_scheduler": "constant", "precision": "fp32", "checkpoint_steps": None},
        "preference": {"format": "hh_rlhf", "beta": BETA, "max_length": max_length, "cache_reference": cache},
    })


def pairs_and_model(max_length: int, cache: bool, steps: int) -> tuple[Any, Any, Any, list[Any]]:
    import pandas as pd

    from tunewright.config import BackendConfig
    from tunewright.model import load_base_model
    from tunewright.preference_data import build_preference_examples, preference_frame

    config = tunewright_config(max_length, cache, steps)
    loaded = load_base_model("smollm2-135m", BackendConfig(device="cpu", dtype="float32"))
    frame, counts = preference_frame(pd.read_json(HH_TRAIN, lines=True).head(PAIRS), config, "train.jsonl")
    examples = build_preference_examples(frame, config, loaded.tokenizer, counts, "train.jsonl").examples
    return config, loaded.model, loaded.tokenizer, examples


def run_tunewright(method: str, max_length: int, steps: int, cache_dir: Path) -> dict[str, Any]:
    from accelerate import Accelerator

    from tunewright.adapters import attach_adapter
    from tunewright.preference_objective import PreferenceObjective, Reference, collate_pairs, evaluate_pairs
    from tunewright.preference_training import cache_reference_logps
    from tunewright.train import Batching, fit

    cached = method != "tunewright_uncached"
    config, model, tokenizer, examples = pairs_and_model(max_length, cached, steps)
    model = attach_adapter(model, config.adapter, steps)
    accelerator = Accelerator(cpu=True)
    reference_seconds = 0.0
    if cached:
        started = time.perf_counter()
        cache_reference_logps([examples], model, Reference(), config, tokenizer, accelerator, cache_dir)
        reference_seconds = time.perf_counter() - started
    objective = PreferenceObjective(model, "dpo", config.preference, Reference())
    times: list[float] = []
    batching = Batching(collate=collate_pairs, begin_window=lambda _examples, indices: len(indices),
                        step_metrics=objective.take_step_metrics, evaluate=evaluate_pairs)
    started = time.perf_counter()
    times.append(started)
    fit(objective, examples, [], config.trainer, accelerator, tokenizer.pad_token_id, show_progress=False,
        on_log=lambda record: times.append(time.perf_counter()), batching=batching)
    return {"reference_seconds": reference_seconds, "step_times": times, "pairs": len(examples),
            "tokens": sum(len(e.input_ids) for e in examples)}


def run_trl(method: str, max_length: int, steps: int) -> dict[str, Any]:
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import TrainerCallback

    config, model, tokenizer, examples = pairs_and_model(max_length, False, steps)
    eos = tokenizer.eos_token
    rows = [{"prompt": tokenizer.decode(e.prompt_ids), "chosen": tokenizer.decode(e.chosen_ids[:-1]) + eos,
             "rejected": tokenizer.decode(e.rejected_ids[:-1]) + eos} for e in examples]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            times.append(time.perf_counter())

    precompute = method == "trl_precomputed"
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH_SIZE, max_steps=steps,
                         learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_grad_norm=1.0, beta=BETA,
                         report_to=[], use_cpu=True, bf16=False, fp16=False, logging_steps=1, save_strategy="no",
                         max_length=None, precompute_ref_log_probs=precompute, dataloader_num_workers=0,
                         seed=42, gradient_checkpointing=False)  # trl's default is on; tunewright's off
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                      target_modules=["q_proj", "v_proj"], bias="none")
    started = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    reference_seconds = time.perf_counter() - started if precompute else 0.0  # tokenizing + the reference pass
    trainer.train()
    tokens = sum(len(trainer.train_dataset[i]["prompt_ids"]) * 2 + len(trainer.train_dataset[i]["chosen_ids"])
                 + len(trainer.train_dataset[i]["rejected_ids"]) for i in range(len(rows)))
    return {"reference_seconds": reference_seconds, "step_times": times, "pairs": len(rows), "tokens": tokens}


def worker(method: str, max_length: int, steps: int, cache_dir: Path) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    if method.startswith("trl"):
        result = run_trl(method, max_length, steps)
    else:
        result = run_tunewright(method, max_length, steps, cache_dir)
    times = result.pop("step_times")
    per_step = (times[-1] - times[1]) / (len(times) - 2)  # steps 2..n
    epoch_steps = -(-result["pairs"] // BATCH_SIZE)
    epoch_seconds = result["reference_seconds"] + epoch_steps * per_step
    return {**result, "seconds_per_step": per_step, "epoch_seconds": epoch_seconds,
            "pairs_per_s": result["pairs"] / epoch_seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--update", action="store_true", help="keep --out's other methods, rerun only --methods")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.max_length, args.steps, args.cache_dir)))
        return
    cache_dir = Path(tempfile.mkdtemp()) / "cache"
    results: dict[str, Any] = {}
    if args.update and args.out is not None and args.out.is_file():
        results = json.loads(args.out.read_text(encoding="utf-8"))["methods"]
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--max-length",
                   str(args.max_length), "--cache-dir", str(cache_dir)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(method, json.dumps(results[method]), flush=True)
    baseline = results.get("trl")
    if baseline:
        for result in results.values():
            result["speedup_vs_trl"] = result["pairs_per_s"] / baseline["pairs_per_s"]
    save_json({"settings": {"pairs": PAIRS, "batch_size": BATCH_SIZE, "steps_timed": args.steps - 1,
                            "max_length": args.max_length, "model": "smollm2-135m", "device": "cpu", "lora_r": 8},
               "methods": results}, args.out)


if __name__ == "__main__":
    main()
