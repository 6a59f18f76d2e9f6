"""Category outputs on real data: zero-shot and fine-tuned accuracy for both decoders (issue 3).

Runs smollm2-135m on ../shared/data/sst2 (binary sentiment) and ../shared/data/trec (6 question
types): label scoring zero-shot, then a LoRA fine-tune per decoder (`label_scoring`: LM loss on
the gold label text; `classifier`: averaged token probabilities -> linear head, cross-entropy),
each evaluated on the public test file (optionally a seeded sample of it). Prints one JSON line
per run and appends them to --out. Prompts are plain text, not SmolLM2's chat template: that
template adds a ~30-token system prompt to every row, which more than doubles the cost of a run
on a shared 2-core CPU.

    .venv/bin/python bench/category.py --out bench/results/category.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

import tunewright

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {
        "task": "Is this movie review positive or negative?",
        "template": "Review: {text}\nSentiment:",
        "labels": ["negative", "positive"],
    },
    "trec": {
        "task": "What does this question ask for: abbreviation, description, entity, human, location "
        "or number?",
        "template": "Question: {text}\nType:",
        "labels": ["abbreviation", "description", "entity", "human", "location", "number"],
    },
}


def config_for(
    name: str, decoder: str, trainer: dict[str, Any], with_task: bool = True, normalization: str = "sum"
) -> dict[str, Any]:
    """The run's config; fine-tuned runs may leave out the instruction line (there it only costs tokens)."""
    spec = TASKS[name]
    return {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "text"}],
        "output_features": [
            {
                "name": "label",
                "type": "category",
                "decoder": decoder,
                "labels": spec["labels"],
                "score_normalization": normalization,
            }
        ],
        "prompt": {
            "task": spec["task"] if with_task else None,
            "template": spec["template"],
            "use_chat_template": False,
        },
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "trainer": trainer,
        "preprocessing": {"max_input_length": 96},
        "backend": {"device": "cpu"},
    }


def splits(
    name: str, train_rows: int, validation_rows: int, test_rows: int | None
) -> tuple[pd.DataFrame, ...]:
    """Seeded samples: training rows from train.csv; validation from validation.csv (else held-out train)."""
    train = pd.read_csv(DATA / name / "train.csv").sample(frac=1.0, random_state=0).reset_index(drop=True)
    if (DATA / name / "validation.csv").is_file():
        validation = pd.read_csv(DATA / name / "validation.csv").sample(n=validation_rows, random_state=0)
    else:
        validation = train.iloc[train_rows : train_rows + validation_rows]
    test = pd.read_csv(DATA / name / "test.csv")
    if test_rows is not None and test_rows < len(test):
        test = test.sample(n=test_rows, random_state=0)
    columns = ["text", "label"]
    return train.iloc[:train_rows][columns], validation[columns].reset_index(drop=True), test[columns]


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "expected_calibration_error", "loss", "rows")
    return {key: metrics[key] for key in keys if key in metrics}


def run(name: str, args: argparse.Namespace, out: Path) -> None:
    train, validation, test = splits(name, args.train_rows, args.validation_rows, args.test_rows)
    majority = float(test["label"].value_counts(normalize=True).iloc[0])

    def record(entry: dict[str, Any]) -> None:
        """Append each result as soon as it exists, so a run cut short keeps what it finished."""
        entry.update(majority_class_rate=majority, test_rows=len(test))
        with out.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    for decoder in args.zero_shot_decoders if "zero" in args.stages else []:
        started = time.perf_counter()
        trainer = {"type": "none", "eval_batch_size": 16}
        model = tunewright.from_config(config_for(name, decoder, trainer, normalization=args.normalization))
        metrics = tunewright.evaluate(model, test)
        record(
            {
                "dataset": name,
                "decoder": decoder,
                "mode": "zero-shot",
                "score_normalization": args.normalization,
                "eval_seconds": time.perf_counter() - started,
                **summary(metrics),
            }
        )
    for decoder in args.decoders:
        trainer = {
            "type": "finetune",
            "epochs": 1,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "warmup_ratio": 0.05,
            "eval_batch_size": 16,
            "seed": 0,
            "log_every": 10,
        }
        if args.max_steps:
            trainer["max_steps"] = args.max_steps
        run_dir = Path(args.runs) / f"{name}-{decoder}"
        started = time.perf_counter()
        result = tunewright.train(
            config_for(
                name, decoder, trainer, with_task=args.finetune_task, normalization=args.normalization
            ),
            train,
            run_dir,
            validation=validation,
            overwrite=True,
            show_progress=False,
        )
        train_seconds = result.metrics["training"]["seconds"]
        evaluation_started = time.perf_counter()
        metrics = tunewright.evaluate(result.model, test, output=run_dir / "test_metrics.json")
        record(
            {
                "dataset": name,
                "decoder": decoder,
                "mode": "fine-tuned",
                "score_normalization": args.normalization,
                "train_rows": len(train),
                "batch_size": args.batch_size,
                "learning_rate": args.lr,
                "prompt_task_line": args.finetune_task,
                "steps": result.metrics["training"]["steps"],
                "train_seconds": train_seconds,
                "total_seconds": time.perf_counter() - started,
                "eval_seconds": time.perf_counter() - evaluation_started,
                "validation_accuracy": result.metrics["validation"]["accuracy"],
                **summary(metrics),
            }
        )


def markdown_table(path: Path) -> str:
    """The results file as a Markdown table (one row per dataset x decoder x mode)."""
    lines = [
        "| dataset | decoder | mode | test rows | accuracy | macro-F1 | ECE | loss | majority rate "
        "| train rows / steps | train s | eval s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for raw in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(raw)
        trained = f"{row['train_rows']} / {row['steps']}" if "steps" in row else "-"
        train_seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-"
        lines.append(
            f"| {row['dataset']} | {row['decoder']} | {row['mode']} | {int(row['rows'])} "
            f"| {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['expected_calibration_error']:.3f} "
            f"| {row['loss']:.3f} | {row['majority_class_rate']:.3f} | {trained} | {train_seconds} "
            f"| {row['eval_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--decoders", nargs="+", default=["label_scoring", "classifier"])
    parser.add_argument("--stages", nargs="+", default=["zero", "finetune"])
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--validation-rows", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=None, help="subsample the test file (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--normalization", choices=["sum", "mean"], default="sum")
    parser.add_argument("--zero-shot-decoders", nargs="+", default=["label_scoring", "classifier"])
    parser.add_argument(
        "--finetune-task", action=argparse.BooleanOptionalAction, default=False,
        help="keep the instruction line in the fine-tuned runs' prompts (zero-shot runs always have it)",
    )
    parser.add_argument("--runs", default="/tmp/tunewright-category-runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/category.jsonl"))
    parser.add_argument("--report", action="store_true", help="print --out as a Markdown table and exit")
    args = parser.parse_args()
    if args.report:
        print(markdown_table(args.out))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if "finetune" not in args.stages:
        args.decoders = []
    for name in args.datasets:
        run(name, args, args.out)


if __name__ == "__main__":
    main()
