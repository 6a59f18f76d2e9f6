"""The default recipe against the goals, on the public test files: SST-2 and TREC accuracy, WikiSQL exact match.

Each task is one whole run of the default model with the schema's defaults (LoRA r=8 on every linear
layer, learning rate 1e-3, 5% warmup then linear decay, batch 4) and a `trainer.time_budget` that leaves
room, within --total seconds, for loading and for scoring the test file. Every training row is trained
on (no validation split: the whole budget trains); the test file is scored once at the end. Wall
seconds run from the start of `train` to the end of the test scoring. Prompts are those of
bench/category.py (SST-2, TREC) and bench/recipe_grid.py (WikiSQL).

    .venv/bin/python bench/goals.py --out bench/results/goals.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from category import DATA, config_for
from recipe_grid import WIKISQL, text_config

import tunewright
from tunewright.data import calibration_sample
from tunewright.kernels.precision import mixed_precision_for

GOALS = {"sst2": ("accuracy", 0.90), "trec": ("accuracy", 0.85), "wikisql": ("exact_match", 0.5)}
# Seconds kept out of the budget for loading, tokenising and scoring the test file (measured on 2 cores).
RESERVE = {"sst2": 180, "trec": 150, "wikisql": 240}


def default_recipe(dataset: str, time_budget: float) -> dict[str, Any]:
    trainer = {"time_budget": time_budget}
    if dataset == "wikisql":
        config = text_config(dataset, trainer)
    else:
        config = config_for(dataset, "label_scoring", trainer, with_task=False)
    config["adapter"] = {"type": "lora"}  # every key the default
    config["preprocessing"] = {**config.get("preprocessing", {}), "split": [1.0, 0.0, 0.0]}
    return config


def data(dataset: str, train_rows: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if dataset == "wikisql":
        train = pd.read_json(WIKISQL / "train.jsonl", lines=True, dtype=False)
        test = pd.read_json(WIKISQL / "test.jsonl", lines=True, dtype=False)
    else:
        train = pd.read_csv(DATA / dataset / "train.csv")[["text", "label"]]
        test = pd.read_csv(DATA / dataset / "test.csv")[["text", "label"]]
    train = train.sample(frac=1.0, random_state=0).reset_index(drop=True)
    return (train if train_rows is None else train.head(train_rows)), test


def run(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    budget = args.budget if args.budget is not None else args.total - RESERVE[dataset]
    train, test = data(dataset, args.train_rows)
    if args.test_rows is not None:
        test = test.head(args.test_rows)
    started = time.perf_counter()
    result = tunewright.train(default_recipe(dataset, budget), train, Path(args.runs) / dataset, overwrite=True,
                              show_progress=False)
    trained = time.perf_counter()
    metrics = tunewright.evaluate(result.model, test)
    metric, goal = GOALS[dataset]
    training = result.metrics["training"]
    entry = {"dataset": dataset, "metric": metric, "value": metrics[metric], "goal": goal,
             "test_rows": len(test), "train_rows": len(train), "time_budget": budget,
             "steps": training["steps"], "chosen": training.get("time_budget"),
             "train_seconds": trained - started, "test_seconds": time.perf_counter() - trained,
             "wall_seconds": time.perf_counter() - started, "machine": machine(),
             **{key: metrics[key] for key in ("macro_f1", "bleu", "token_accuracy") if key in metrics}}
    if dataset != "wikisql":  # outside the wall time: the same weights scored with calibration: rows
        entry["calibration_rows"] = rows_calibrated(result.model, train, test)
    return entry


def machine() -> dict[str, str]:
    """The CPU the figure was measured on, and the precision `auto` trained at there."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return {"cpu": names[0] if names else platform.processor(),
            "precision": mixed_precision_for("auto", torch.device("cpu"))}


def rows_calibrated(model: Any, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Test accuracy and macro-F1 of the trained model with `calibration: rows`, as a run with it would score."""
    output = model.config.output_features[0].model_copy(update={"calibration": "rows"})
    model.config = model.config.model_copy(update={"output_features": [output]})
    model.calibration_inputs, model.label_prior = calibration_sample(train, model.config), None
    metrics = tunewright.evaluate(model, test)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(GOALS))
    parser.add_argument("--total", type=float, default=900, help="seconds each whole run may take")
    parser.add_argument("--budget", type=float, default=None, help="trainer.time_budget (default: --total minus "
                        "a per-task reserve for loading and test scoring)")
    parser.add_argument("--train-rows", type=int, default=None, help="first N shuffled training rows (default all)")
    parser.add_argument("--test-rows", type=int, default=None, help="first N test rows (default: the whole file)")
    parser.add_argument("--runs", default="/tmp/tunewright-goals")
    parser.add_argument("--out", type=Path, default=Path("bench/results/goals.jsonl"))
    args = parser.parse_args()
    for dataset in args.datasets:
        entry = run(dataset, args)
        with args.out.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
