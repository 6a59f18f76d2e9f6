"""Calibration: zero-shot label scoring over 5 prompt wordings, uncalibrated and both calibrations.

Runs smollm2-135m zero-shot (trainer.type none, decoder label_scoring) on the public test files of
../shared/data/sst2 and ../shared/data/trec. For each wording the uncalibrated label scores are computed
once, then divided by a prior (output_features[].calibration): `content_free`, the labels' probabilities
for content-free inputs in the same prompt; `rows`, their mean probabilities over the 256 training inputs
(train.csv, labels unused) that a run would sample. Reports accuracy and macro-F1 per wording and the spread.

    .venv/bin/python bench/calibration.py [--rows N] --out bench/results/calibration_<machine>.json
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
from tunewright.data import calibration_sample
from tunewright.heads import calibrate, mean_prior
from tunewright.metrics import category_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = {
    "sst2": ["negative", "positive"],
    "trec": ["abbreviation", "description", "entity", "human", "location", "number"],
}
WORDINGS = {
    "sst2": [
        "Review: {text}\nSentiment:",
        "Review: {text}\nSentiment (negative or positive):",
        "{text}\nIs this review positive or negative? Answer:",
        "Movie review: {text}\nThe review is",
        "Text: {text}\nLabel (positive/negative):",
    ],
    "trec": [
        "Question: {text}\nType:",
        "Question: {text}\nAnswer type (abbreviation, description, entity, human, location or number):",
        "{text}\nThis question asks for a",
        "Classify the question.\nQuestion: {text}\nCategory:",
        "Q: {text}\nThe answer is a kind of",
    ],
}
KINDS = ("uncalibrated", "content_free", "rows")


def scores(predicted: Any, frame: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    names = [labels[index] for index in predicted.argmax(dim=-1).tolist()]
    confidence = predicted.exp().max(dim=-1).values.tolist()
    metrics = category_metrics(names, frame["label"].tolist(), confidence, labels)
    return {name: metrics[name] for name in ("accuracy", "macro_f1", "expected_calibration_error")}


def run_dataset(name: str, rows: int | None) -> list[dict[str, Any]]:
    frame = pd.read_csv(DATA / name / "test.csv", dtype=str, keep_default_na=False)
    frame = frame.head(rows) if rows else frame
    base = {
        "base_model": "smollm2-135m", "input_features": [{"name": "text"}],
        "output_features": [{"name": "label", "type": "category", "labels": LABELS[name]}],
        "trainer": {"type": "none"},
    }
    model = tunewright.from_config(base)
    train = pd.read_csv(DATA / name / "train.csv", dtype=str, keep_default_na=False)
    results = []
    for template in WORDINGS[name]:
        model.config = load_config({**base, "prompt": {"template": template}})
        rows_config = load_config({**base, "prompt": {"template": template}, "output_features": [
            {**base["output_features"][0], "calibration": "rows"}]})
        started = time.perf_counter()
        raw = model.uncalibrated_label_log_probs(model.encode_frame(frame))
        sample = calibration_sample(train, rows_config)
        rows_prior = mean_prior(model.uncalibrated_label_log_probs(model.encode_frame(sample)))
        results.append({"dataset": name, "template": template, "test_rows": len(frame),
                        "seconds": round(time.perf_counter() - started, 1),
                        "uncalibrated": scores(raw, frame, LABELS[name]),
                        "content_free": scores(calibrate(raw, model.content_free_log_prior()), frame, LABELS[name]),
                        "rows": scores(calibrate(raw, rows_prior), frame, LABELS[name])})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--rows", type=int, default=None, help="Only the first N test rows (default: all).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = [result for name in args.datasets for result in run_dataset(name, args.rows)]
    summary = {}
    for name in args.datasets:
        mine = [result for result in results if result["dataset"] == name]
        summary[name] = {kind: {"accuracy_min": min(r[kind]["accuracy"] for r in mine),
                                "accuracy_max": max(r[kind]["accuracy"] for r in mine)}
                         for kind in KINDS}
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({"results": results, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
