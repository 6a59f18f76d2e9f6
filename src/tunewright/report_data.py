"""What a report shows, read from a run folder: config, status, metrics, training log and predictions.

Everything is read leniently: a zero-shot run has no training log, an older run has no predictions
files, and a line cut short by a kill is skipped. Only a folder that is not a complete run is refused.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunewright.errors import RunFolderError

# The names run.py writes, restated: importing run.py would load torch, and `tunewright report` loads no model.
CONFIG_FILE = "config.yaml"
STATUS_FILE = "run.json"
METRICS_FILE = "metrics.json"
TRAINING_LOG_FILE = "training_log.jsonl"
REPORT_FILE = "report.html"
SPLITS = ("validation", "test")
PREDICTION = "prediction"
PROBABILITY = "prediction_probability"


def predictions_file(split: str) -> str:
    """The evaluated rows of a split, beside the metrics (written when the run completes)."""
    return f"predictions_{split}.jsonl"


@dataclass
class RunRecord:
    """A run folder as the report sees it."""

    folder: Path
    config_text: str
    config: dict[str, Any]
    status: dict[str, Any]
    metrics: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by split
    label: str = ""  # what a comparison calls the run (default: the folder's name)

    @property
    def name(self) -> str:
        return self.label or self.folder.resolve().name

    @property
    def output(self) -> dict[str, Any]:
        """The output feature's section of the config ({} when the config has none)."""
        outputs = self.config.get("output_features") or [{}]
        return outputs[0] if isinstance(outputs[0], dict) else {}

    @property
    def is_category(self) -> bool:
        return self.output.get("type") == "category"

    @property
    def input_columns(self) -> list[str]:
        return [str(feature.get("name")) for feature in self.config.get("input_features") or []
                if isinstance(feature, dict)]


def check_report_source(run_dir: Path) -> None:
    """Raise unless `run_dir` holds a complete run (a report of a half-written run would mislead).

    Raises:
        RunFolderError: missing folder, not a run folder, or a run that is not complete.
    """
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / STATUS_FILE).is_file():
        raise RunFolderError(f"{run_dir}: not a tunewright run folder (no {CONFIG_FILE} or {STATUS_FILE})")
    state = _read_json(run_dir / STATUS_FILE, {}).get("status") or "unknown"
    if state != "complete":
        raise RunFolderError(
            f"{run_dir}: the run is {state}, not complete; its report is written when it completes "
            "(resume it with `tunewright train --resume`)"
        )


def read_run(run_dir: str | Path) -> RunRecord:
    """Everything the report shows, from a complete run folder.

    Raises:
        RunFolderError: not a complete run folder, or a config.yaml that is not YAML.
    """
    run_dir = Path(run_dir)
    check_report_source(run_dir)
    config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8", errors="replace")
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        raise RunFolderError(f"{run_dir / CONFIG_FILE}: not valid YAML; restore the run's config") from None
    record = RunRecord(
        folder=run_dir,
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
        status=_read_json(run_dir / STATUS_FILE, {}),
        metrics=_read_json(run_dir / METRICS_FILE, {}),
        log=read_json_lines(run_dir / TRAINING_LOG_FILE),
    )
    for split in SPLITS:
        rows = read_json_lines(run_dir / predictions_file(split))
        if rows:
            record.predictions[split] = rows
    return record


def _read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return value if isinstance(value, dict) else default


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The objects in a JSON-lines file ([] when it is missing); lines that are not objects are skipped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", errors="replace") as stream:
        for line in stream:
            try:
                value = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(value, dict):
                rows.append(value)
    return rows


def series(log: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one numeric field of the training log, skipping records without it."""
    steps, values = [], []
    for record in log:
        value, step = record.get(key), record.get("step")
        if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(step, int | float):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} of the numbers in metrics.json (nested reports are shown elsewhere)."""
    table: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        values = metrics.get(split)
        if isinstance(values, dict):
            table[split] = {name: value for name, value in values.items()
                            if isinstance(value, int | float) and not isinstance(value, bool)}
    return table


@dataclass
class ReliabilityBin:
    low: float
    high: float
    rows: int
    confidence: float  # mean predicted probability in the bin
    accuracy: float  # share of the bin's predictions that were right


def reliability_bins(rows: list[dict[str, Any]], target: str, bins: int = 10) -> list[ReliabilityBin]:
    """Predictions grouped by their probability into equal-width bins (a reliability diagram's bars).

    A perfectly calibrated model's bars sit on the diagonal: of the predictions made with 70%
    confidence, 70% are right.
    """
    grouped: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for row in rows:
        probability = row.get(PROBABILITY)
        if not isinstance(probability, int | float) or not 0.0 <= probability <= 1.0:
            continue
        position = min(int(probability * bins), bins - 1)
        grouped[position].append((float(probability), str(row.get(PREDICTION)) == str(row.get(target))))
    result = []
    for position, members in enumerate(grouped):
        if members:
            result.append(ReliabilityBin(
                low=position / bins, high=(position + 1) / bins, rows=len(members),
                confidence=sum(p for p, _ in members) / len(members),
                accuracy=sum(1 for _, right in members if right) / len(members),
            ))
    return result


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_summary(device: Any) -> dict[str, Any]:
    """Where the run ran, recorded in run.json (a report regenerated elsewhere still names the right machine).

    Called as a run completes, so it never raises: a GPU that cannot be queried is left out.
    """
    import torch

    summary: dict[str, Any] = {
        "device": str(device), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "platform": platform.platform(terse=True), "python": platform.python_version(), "torch": torch.__version__,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        try:
            properties = torch.cuda.get_device_properties(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):
            return summary
        summary["gpu"] = properties.name
        summary["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        summary["gpu_count"] = torch.cuda.device_count()
    return summary
