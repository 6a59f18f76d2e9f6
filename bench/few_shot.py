"""Few-shot prompts: zero-shot against k solved training examples, random and semantic, by label scoring.

Runs smollm2-135m with no training (trainer.type none, decoder label_scoring) on the full public test
files of ../shared/data/sst2 and ../shared/data/trec. The few-shot pool is the dataset's train.csv (the
test rows never enter it); `semantic` picks the training prompts nearest each test prompt by the
packaged all-MiniLM-L6-v2 embeddings. Reports accuracy, macro-F1 and seconds per condition.

    .venv/bin/python bench/few_shot.py [--rows N] [--k 4] --out bench/results/few_shot_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

import tunewright
from tunewright.metrics import category_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = {
    "sst2": ["negative", "positive"],
    "trec": ["abbreviation", "description", "entity", "human", "location", "number"],
}
# The best zero-shot wording of each dataset in bench/calibration.py.
TEMPLATES = {"sst2": "Review: {text}\nSentiment:", "trec": "Question: {text}\nType:"}


def read(name: str, split: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name / f"{split}.csv", dtype=str, keep_default_na=False)[["text", "label"]]


def config(name: str, few_shot: dict[str, Any] | None) -> dict[str, Any]:
    prompt: dict[str, Any] = {"template": TEMPLATES[name]}
    if few_shot is not None:
        prompt["few_shot"] = few_shot
    return {
        "base_model": "smollm2-135m", "input_features": [{"name": "text"}],
        "output_features": [{"name": "label", "type": "category", "labels": LABELS[name]}],
        "prompt": prompt, "trainer": {"type": "none", "eval_batch_size": 16},
    }


def run_condition(name: str, condition: str, k: int, test: pd.DataFrame, train: pd.DataFrame) -> dict[str, Any]:
    few_shot = None if condition == "zero-shot" else {"k": k, "strategy": condition}
    started = time.perf_counter()
    model = tunewright.from_config(config(name, few_shot), few_shot_pool=train if few_shot else None)
    pool_seconds = time.perf_counter() - started
    prompt_ids = model.encode_frame(test)
    log_probs = model.uncalibrated_label_log_probs(prompt_ids)
    names = [LABELS[name][index] for index in log_probs.argmax(dim=-1).tolist()]
    metrics = category_metrics(names, test["label"].tolist(), log_probs.exp().max(dim=-1).values.tolist(),
                               LABELS[name])
    return {"dataset": name, "condition": condition, "k": 0 if few_shot is None else k, "rows": len(test),
            "pool_rows": len(train) if few_shot else 0,
            "mean_prompt_tokens": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "load_and_pool_seconds": round(pool_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| data | prompt | accuracy | macro-F1 | mean prompt tokens | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in results:
        shown = row["condition"] if row["k"] == 0 else f"k = {row['k']} {row['condition']}"
        lines.append(f"| {row['dataset']} | {shown} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | "
                     f"{row['mean_prompt_tokens']:.0f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--conditions", nargs="+", default=["zero-shot", "random", "semantic"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rows", type=int, default=None, help="first N test rows only (a quick check)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for name in args.datasets:
        test, train = read(name, "test"), read(name, "train")
        test = test.head(args.rows) if args.rows else test
        for condition in args.conditions:
            results.append(run_condition(name, condition, args.k, test, train))
            print(json.dumps(results[-1]), flush=True)
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "k": args.k,
                                        "results": results}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
