"""The default recipe, measured: one setting changed at a time from a base LoRA recipe, on validation rows.

For SST-2 and TREC (../shared/data; category outputs, label scoring unless the variant says otherwise),
each variant fine-tunes smollm2-135m on the same seeded training rows for the same number of steps and
is scored on the same held-out validation rows (SST-2: a seeded sample of validation.csv; TREC, which
has no validation file: training rows the runs never see). The test files are not touched. Variants:

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

from category import config_for, splits  # bench/category.py: the same prompts and data handling

import tunewright

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


def variant_config(dataset: str, variant: str, steps: int) -> dict[str, Any]:
    change = VARIANTS[variant]
    config = config_for(dataset, change.get("decoder", "label_scoring"),
                        {**BASE_TRAINER, "max_steps": steps, **change.get("trainer", {})}, with_task=False)
    config["adapter"] = {**config["adapter"], **change.get("adapter", {})}
    return config


def run(dataset: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    train, validation, _ = splits(dataset, args.train_rows, args.validation_rows, test_rows=1)
    started = time.perf_counter()
    result = tunewright.train(variant_config(dataset, variant, args.steps), train,
                              Path(args.runs) / f"{dataset}-{variant}", overwrite=True, show_progress=False)
    metrics = tunewright.evaluate(result.model, validation)
    return {"dataset": dataset, "variant": variant, "steps": args.steps, "train_rows": len(train),
            "validation_rows": len(validation), "seconds": time.perf_counter() - started,
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "trainable_parameters": result.metrics["training"].get("trainable_parameters")}


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lines = ["| dataset | variant | validation accuracy | macro-F1 | vs base | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = {row["dataset"]: row["accuracy"] for row in rows if row["variant"] == "base"}
    for row in rows:
        delta = row["accuracy"] - base[row["dataset"]] if row["dataset"] in base else float("nan")
        lines.append(f"| {row['dataset']} | {row['variant']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} "
                     f"| {delta:+.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["trec", "sst2"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=150)
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
