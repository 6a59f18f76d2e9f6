"""Reward accuracy and margin on held-out hh-rlhf pairs, before and after DPO and ORPO (smollm2-135m, CPU).

Train on the first --train-pairs pairs of the shared hh-rlhf harmless train.jsonl (one epoch,
LoRA r=8, batch 4, lr 5e-4, --max-length tokens, the prompt losing its start), then score the
300 pairs of test.jsonl (pairs whose longest reply does not fit are dropped and counted).

- DPO: the reference is the base model, so before training every reward is 0 (accuracy 0, margin 0
  by construction). After: rewards β·(log π − log π_ref) on the test pairs, the reference
  log-probs being the base model's (computed once, as the cache does).
- ORPO: rewards are λ × the per-token average log-probs, so "before" is the base model's own
  preference: the share of pairs where it finds the chosen reply more likely per token.

    flock /tmp/tunewright-bench.lock .venv/bin/python bench/preference_results.py --train-pairs 64 \
        --out bench/results/preference_results_avx2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_json  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless"


def config_for(trainer: str, max_length: int, steps: int) -> Any:
    from tunewright.config import validate_config

    preference: dict[str, Any] = {"format": "hh_rlhf", "max_length": max_length}
    preference.update({"beta": 0.1} if trainer == "dpo" else {"orpo_lambda": 0.1})
    return validate_config({
        "base_model": "smollm2-135m", "input_features": [{"name": "prompt"}], "output_features": [{"name": "chosen"}],
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "trainer": {"type": trainer, "batch_size": 4, "eval_batch_size": 8, "learning_rate": 5e-4,
                    "max_steps": steps, "lr_scheduler": "constant", "precision": "fp32", "checkpoint_steps": None},
        "preference": preference,
    })


def pairs(path: Path, rows: int | None, config: Any, tokenizer: Any) -> tuple[list[Any], dict[str, int]]:
    from tunewright.preference_data import build_preference_examples, preference_frame

    frame = pd.read_json(path, lines=True)
    frame = frame.head(rows) if rows else frame
    frame, counts = preference_frame(frame, config, path.name)
    examples = build_preference_examples(frame, config, tokenizer, counts, path.name).examples
    return examples, counts.as_dict()


def score(model: Any, trainer: str, config: Any, examples: list[Any], pad_id: int) -> dict[str, float]:
    from tunewright.preference_objective import PreferenceObjective, Reference, evaluate_pairs

    objective = PreferenceObjective(model, trainer, config.preference, Reference())
    return evaluate_pairs(objective, examples, config.trainer.eval_batch_size, pad_id)


def train_one(trainer: str, args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    from tunewright.adapters import attach_adapter
    from tunewright.config import BackendConfig
    from tunewright.model import load_base_model
    from tunewright.preference_objective import PreferenceObjective, Reference, collate_pairs, evaluate_pairs
    from tunewright.reference_cache import compute_reference_logps
    from tunewright.train import Batching, fit

    steps = args.train_pairs // 4
    config = config_for(trainer, args.max_length, steps)
    loaded = load_base_model("smollm2-135m", BackendConfig(device="cpu", dtype="float32"))
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    train, train_counts = pairs(DATA / "train.jsonl", args.train_pairs, config, tokenizer)
    test, test_counts = pairs(DATA / "test.jsonl", None, config, tokenizer)
    model = attach_adapter(loaded.model, config.adapter, steps)
    device = torch.device("cpu")
    result: dict[str, Any] = {"train_pairs": train_counts, "test_pairs": test_counts}
    started = time.perf_counter()
    if trainer == "dpo":  # the base model's log-probs: the reference of training and of the test scores
        for examples in (train, test):
            for example, logps in zip(examples, compute_reference_logps(
                    model, Reference(), examples, 8, pad_id, device).tolist(), strict=True):
                example.reference_logps = tuple(logps)
        result["before"] = {"reward_accuracy": 0.0, "reward_margin": 0.0, "note": "policy == reference"}
    else:
        result["before"] = score(model, trainer, config, test, pad_id)
    objective = PreferenceObjective(model, trainer, config.preference, Reference())
    batching = Batching(collate=collate_pairs, begin_window=lambda _examples, indices: len(indices),
                        step_metrics=objective.take_step_metrics, evaluate=evaluate_pairs)
    fitted = fit(objective, train, [], config.trainer, Accelerator(cpu=True), pad_id, show_progress=False,
                 batching=batching)
    result["train_seconds"] = time.perf_counter() - started
    result["last_step"] = fitted.history[-1]
    result["after"] = score(model, trainer, config, test, pad_id)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--trainers", nargs="+", default=["dpo", "orpo"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    results = {trainer: train_one(trainer, args) for trainer in args.trainers}
    for trainer, result in results.items():
        print(trainer, json.dumps({k: result[k] for k in ("before", "after", "train_seconds")}), flush=True)
    save_json({"settings": {"model": "smollm2-135m", "device": "cpu", "train_pairs": args.train_pairs,
                            "max_length": args.max_length, "epochs": 1, "batch_size": 4, "learning_rate": 5e-4,
                            "beta_or_lambda": 0.1},
               "results": results}, args.out)


if __name__ == "__main__":
    main()
