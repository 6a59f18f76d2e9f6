"""Model selection by exact match (trainer.eval_metric) on the dates demo and on WikiSQL.

Trains smollm2-135m with LoRA, validating every --eval-every steps with `eval_metric: exact_match`
(generated on the first --rows validation rows), and prints, per validation, the loss and the exact
match, marking the step whose weights were kept and the step with the lowest validation loss. It
then checks that the kept weights score, after training, the exact match that chose them. The dates
run also logs to TensorBoard and MLflow (tracking section); both are read back with the tools' own
readers (EventAccumulator, mlflow.search_runs).

    .venv/bin/python bench/eval_metric_selection.py [--tasks dates wikisql] [--out bench/results/FILE.jsonl]

--out appends one JSON line per task (with the arguments it ran with).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

import tunewright
from tunewright.config import load_config
from tunewright.data import as_frame, split_frame

ROOT = Path(__file__).resolve().parents[1]
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"
RUNS = ROOT / "runs" / "eval-metric"


def dates_task(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    config = load_config(ROOT / "examples" / "dates" / "config.yaml")
    # The split train() would make of the one file (preprocessing.split), made here to rescore its rows.
    frame, _ = as_frame(ROOT / "examples" / "dates" / "train.csv")
    splits = split_frame(frame, config.preprocessing, config.trainer.seed)
    resolved = config.model_dump(mode="json")
    resolved["tracking"] = {"tensorboard": True, "mlflow": {"experiment": "dates"}}
    return resolved, splits.train, splits.validation


def wikisql_task(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    config = {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "table_id"}, {"name": "columns"}, {"name": "question"}],
        "output_features": [{"name": "sql"}],
        "prompt": {"template": "table: {table_id}\ncolumns: {columns}\nQ: {question}\nA:"},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "trainer": {"batch_size": 8, "learning_rate": 0.001, "warmup_ratio": 0.05, "lr_scheduler": "cosine"},
        "generation": {"max_new_tokens": 64, "batch_size": 25},
    }
    train = pd.read_json(WIKISQL / "train.jsonl", lines=True, dtype=False)
    validation = pd.read_json(WIKISQL / "valid.jsonl", lines=True, dtype=False)
    return config, train, validation


TASKS = {"dates": dates_task, "wikisql": wikisql_task}


def train_task(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config, train, validation = TASKS[name](args)
    config["trainer"].update(eval_metric="exact_match", eval_every=args.eval_every, max_steps=args.steps,
                             eval_max_rows=args.rows, early_stopping_patience=None, checkpoint_steps=None)
    run_dir = RUNS / name
    started = time.perf_counter()
    result = tunewright.train(config, train, run_dir, validation=validation, overwrite=True, show_progress=False)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    validations = [{"step": r["step"], "val_loss": r["val_loss"], "val_exact_match": r["val_exact_match"]}
                   for r in records if "val_exact_match" in r]
    training = result.metrics["training"]
    best = max(validations, key=lambda r: (r["val_exact_match"], -r["step"]))  # ties keep the earlier step
    lowest_loss = min(validations, key=lambda r: r["val_loss"])
    kept_rows = min(args.rows, len(validation))
    rescored = tunewright.evaluate(result.model, validation.head(kept_rows))
    return {
        "task": name, "seconds": round(seconds, 1), "steps": training["steps"], "validations": validations,
        "kept_step": training["best_step"], "best_exact_match_step": best["step"],
        "lowest_val_loss_step": lowest_loss["step"], "kept_exact_match": training["best_eval_metric"],
        "kept_weights_rescored_exact_match": rescored["exact_match"], "eval_rows": kept_rows,
        "readers": read_trackers(run_dir) if name == "dates" else None,
    }


def read_trackers(run_dir: Path) -> dict[str, Any]:
    """The run's TensorBoard events and MLflow run, read with the tools' own readers."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "dates"))
    events.Reload()
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dates"])
    mlflow.set_tracking_uri("")
    return {
        "tensorboard_scalar_tags": len(events.Tags()["scalars"]),
        "tensorboard_exact_match_points": len(events.Scalars("validation/exact_match")),
        "mlflow_runs": len(runs),
        "mlflow_status": runs.iloc[0]["status"],
        "mlflow_exact_match": float(runs.iloc[0]["metrics.validation/exact_match"]),
    }


def print_table(outcome: dict[str, Any]) -> None:
    print(f"\n{outcome['task']}: {outcome['steps']} steps in {outcome['seconds']} s; exact match on the first "
          f"{outcome['eval_rows']} validation rows")
    print(f"{'step':>6} {'val_loss':>9} {'exact_match':>12}")
    for row in outcome["validations"]:
        marks = [label for label, key in (("kept", "kept_step"), ("lowest loss", "lowest_val_loss_step"))
                 if outcome[key] == row["step"]]
        print(f"{row['step']:>6} {row['val_loss']:>9.4f} {row['val_exact_match']:>12.3f}  {', '.join(marks)}")
    print(f"kept step {outcome['kept_step']} (best exact match: step {outcome['best_exact_match_step']}); lowest "
          f"validation loss: step {outcome['lowest_val_loss_step']}; kept weights rescored after training: "
          f"{outcome['kept_weights_rescored_exact_match']:.3f} (at selection: {outcome['kept_exact_match']:.3f})")
    if outcome["readers"]:
        print(f"trackers read back: {outcome['readers']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["dates", "wikisql"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--rows", type=int, default=40, help="trainer.eval_max_rows")
    parser.add_argument("--out", type=Path, help="append each task's outcome to this JSON Lines file")
    args = parser.parse_args()
    for name in args.tasks:
        outcome = train_task(name, args)
        print_table(outcome)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            settings = {"steps": args.steps, "eval_every": args.eval_every, "rows": args.rows}
            with args.out.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({**settings, **outcome}) + "\n")


if __name__ == "__main__":
    main()
