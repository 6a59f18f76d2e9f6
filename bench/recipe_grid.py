"""The default recipe, measured: one setting changed at a time from a base LoRA recipe, on validation rows.

For SST-2 and TREC (../shared/data; category outputs, label scoring unless the variant says otherwise),
each variant fine-tunes smollm2-135m on the same seeded training rows for the same number of steps and
is scored on the same held-out validation rows (SST-2: a seeded sample of validation.csv; TREC, which
has no validation file: training rows the runs never see). Text outputs, scored by exact match (and
BLEU): WikiSQL (../shared/data/wikisql: train.jsonl, scored on valid.jsonl) and the demo task (the
repository's examples/dates: its config's features, prompt and epochs; scored on the validation rows
its preprocessing.split holds out of train.csv). The test files are not touched. Variants:

- `base`: LoRA r=8, alpha 16 on q_proj/v_proj, learning rate 1e-3, linear decay after 5% warmup;
- `all_linear`: LoRA on every linear layer;  `r16`: rank 16 (alpha 32);
- `lr_2e-4` / `lr_3e-3`: other learning rates;  `cosine`: cosine decay;
- `classifier`: the classifier decoder instead of label scoring.

One JSON line per run is appended to --out as soon as it exists; --report prints the table.

    .venv/bin/python bench/recipe_grid.py --out bench/results/recipe_grid.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from category import config_for, splits  # bench/category.py: the same prompts and data handling

import tunewright
from tunewright.config import load_config
from tunewright.data import as_frame, split_frame

ROOT = Path(__file__).resolve().parents[1]
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"
DEMO = ROOT / "examples" / "dates"
TEXT_DATASETS = ("wikisql", "demo")
# Optimizer steps per run unless --steps is given; None: the demo config's own epochs.
DEFAULT_STEPS: dict[str, int | None] = {"trec": 150, "sst2": 150, "wikisql": 80, "demo": None}

BASE_TRAINER = {"type": "finetune", "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "warmup_ratio": 0.05,
                "lr_scheduler": "linear", "eval_batch_size": 16, "seed": 0, "log_every": 10,
                "checkpoint_steps": None}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "all_linear": {"adapter": {"target_modules": "all-linear"}},
    "r16": {"adapter": {"r": 16, "alpha": 32}},
    "lr_2e-4": {"trainer": {"learning_rate": 2e-4}},
    "lr_3e-3": {"trainer": {"learning_rate": 3e-3}},
    "cosine": {"trainer": {"lr_scheduler": "cosine"}},
    "classifier": {"decoder": "classifier"},
}


def text_config(dataset: str, trainer: dict[str, Any]) -> dict[str, Any]:
    """WikiSQL or the demo task: features, prompt and generation; all rows given train (no split)."""
    if dataset == "wikisql":
        config: dict[str, Any] = {
            "base_model": "smollm2-135m",
            "input_features": [{"name": "table_id"}, {"name": "columns"}, {"name": "question"}],
            "output_features": [{"name": "sql", "type": "text"}],
            "prompt": {"template": "table: {table_id}\ncolumns: {columns}\nQ: {question}\nA:"},
            "generation": {"max_new_tokens": 64, "batch_size": 25},
        }
    else:
        config = yaml.safe_load((DEMO / "config.yaml").read_text(encoding="utf-8"))
        if trainer.get("max_steps") is None:
            trainer = {**trainer, "epochs": config["trainer"].get("epochs", 1)}
    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    return {**config, "adapter": adapter, "trainer": trainer,
            "preprocessing": {**config.get("preprocessing", {}), "split": [1.0, 0.0, 0.0]},
            "backend": {"device": "cpu"}}


def variant_config(dataset: str, variant: str, steps: int | None) -> dict[str, Any]:
    change = VARIANTS[variant]
    trainer = {**BASE_TRAINER, "max_steps": steps, **change.get("trainer", {})}
    if dataset in TEXT_DATASETS:
        config = text_config(dataset, trainer)
    else:
        config = config_for(dataset, change.get("decoder", "label_scoring"), trainer, with_task=False)
    config["adapter"] = {**config["adapter"], **change.get("adapter", {})}
    return config


def text_splits(dataset: str, train_rows: int, validation_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if dataset == "wikisql":
        train = pd.read_json(WIKISQL / "train.jsonl", lines=True, dtype=False)
        validation = pd.read_json(WIKISQL / "valid.jsonl", lines=True, dtype=False)
    else:  # the rows `tunewright train` on the demo config would train and validate on
        demo = load_config(DEMO / "config.yaml")
        frame, _ = as_frame(DEMO / "train.csv")
        parts = split_frame(frame, demo.preprocessing, demo.trainer.seed)
        train, validation = parts.train, parts.validation
    return train.head(train_rows), validation.head(validation_rows)


def scores(metrics: dict[str, Any], dataset: str) -> dict[str, float]:
    if dataset in TEXT_DATASETS:
        return {key: metrics[key] for key in ("exact_match", "bleu", "token_accuracy", "char_error_rate")}
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def run(dataset: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    if dataset in TEXT_DATASETS:
        train, validation = text_splits(dataset, args.train_rows, args.validation_rows)
    else:
        train, validation, _ = splits(dataset, args.train_rows, args.validation_rows, test_rows=1)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[dataset]
    started = time.perf_counter()
    result = tunewright.train(variant_config(dataset, variant, steps), train,
                              Path(args.runs) / f"{dataset}-{variant}", overwrite=True, show_progress=False)
    train_seconds = time.perf_counter() - started
    metrics = tunewright.evaluate(result.model, validation)
    training = result.metrics["training"]
    return {"dataset": dataset, "variant": variant, "steps": training["steps"], "train_rows": len(train),
            "validation_rows": len(validation), "seconds": time.perf_counter() - started,
            "train_seconds": train_seconds, **scores(dict(metrics), dataset),
            "trainable_parameters": training.get("trainable_parameters")}


def report(path: Path) -> str:
    """Category rows: accuracy and macro-F1; text rows: exact match and BLEU (vs base: the first figure)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lines = ["| dataset | variant | steps | validation accuracy / exact match | macro-F1 / BLEU | vs base | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    main = {row["dataset"]: ("exact_match", "bleu") if "exact_match" in row else ("accuracy", "macro_f1")
            for row in rows}
    base = {row["dataset"]: row[main[row["dataset"]][0]] for row in rows if row["variant"] == "base"}
    for row in rows:
        first, second = (row[key] for key in main[row["dataset"]])
        delta = first - base[row["dataset"]] if row["dataset"] in base else float("nan")
        second_text = f"{second:.1f}" if "bleu" in row else f"{second:.3f}"
        lines.append(f"| {row['dataset']} | {row['variant']} | {row['steps']} | {first:.3f} | {second_text} "
                     f"| {delta:+.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["trec", "sst2"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default: 150; the demo: its config's epochs)")
    parser.add_argument("--train-rows", type=int, default=1200)
    parser.add_argument("--validation-rows", type=int, default=300)
    parser.add_argument("--runs", default="/tmp/tunewright-recipe-grid")
    parser.add_argument("--out", type=Path, default=Path("bench/results/recipe_grid.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    for dataset in args.datasets:
        for variant in args.variants:
            entry = run(dataset, variant, args)
            with args.out.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry) + "\n")
            print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
