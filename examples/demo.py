"""`make demo`: the default model before and after a short LoRA fine-tune on the shipped dates data.

Prints before/after metrics on the held-out test file and a few sample predictions.
Run from the repository root: `.venv/bin/python examples/demo.py`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import tunewright
from tunewright.config import load_config

HERE = Path(__file__).parent / "dates"
RUN_DIR = Path("runs/demo")
SHOWN_METRICS = ["exact_match", "char_error_rate", "bleu", "rouge_l", "token_accuracy", "loss", "perplexity"]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    for noisy in ("transformers", "accelerate", "peft", "httpx", "absl"):  # absl: rouge-score's tokenizer notice
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = Console()
    config = load_config(HERE / "config.yaml")
    test_file = HERE / "test.csv"
    started = time.perf_counter()

    console.rule("1. the base model, before fine-tuning (zero-shot)")
    zero_shot = config.model_copy(update={"trainer": config.trainer.model_copy(update={"type": "none"})})
    base = tunewright.from_config(zero_shot)
    before = tunewright.evaluate(base, test_file, show_progress=True)
    before_predictions = tunewright.predict(base, test_file)["prediction"].tolist()
    del base

    console.rule("2. LoRA fine-tuning on examples/dates/train.csv")
    result = tunewright.train(config, HERE / "train.csv", RUN_DIR, overwrite=True)

    console.rule("3. the fine-tuned model, reloaded from its run folder")
    tuned = tunewright.load(RUN_DIR)
    after = tunewright.evaluate(tuned, test_file, show_progress=True)
    predictions = tunewright.predict(tuned, test_file)

    table = Table(title=f"test set ({len(predictions)} rows): before vs after fine-tuning")
    for column in ("metric", "before", "after"):
        table.add_column(column)
    for name in SHOWN_METRICS:
        table.add_row(name, f"{before[name]:.3f}", f"{after[name]:.3f}")
    console.print(table)

    samples = Table(title="sample predictions")
    for column in ("date", "expected", "before", "after"):
        samples.add_column(column)
    for row in range(6):
        samples.add_row(predictions["date"][row], predictions["iso"][row], before_predictions[row][:40],
                        predictions["prediction"][row])
    console.print(samples)
    console.print(
        f"training: {result.metrics['training']['steps']} steps in {result.metrics['training']['seconds']:.0f} s; "
        f"demo total {time.perf_counter() - started:.0f} s; run folder: {RUN_DIR}"
    )


if __name__ == "__main__":
    main()
