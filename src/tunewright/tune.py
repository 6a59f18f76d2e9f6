"""`tunewright tune`: hyperparameter search with Optuna over the config's `tune:` section.

Each trial is a normal training run (api.train) into OUTPUT/trials/trial-NNN. Optuna's TPE sampler
picks the values; its median pruner stops a trial whose validation metric, reported at each of the
training loop's evaluations, trails the earlier trials'. The study lives in OUTPUT/study.db (SQLite),
so a search that was stopped resumes where it was: finished trials are not run again.

Trials run one after another in this process, on one device. With several devices (every GPU when
there are several, or `devices`), one worker process per device draws trials from the same study.db
(tune_devices.py); TPE then samples with a constant liar, so workers do not pick the same values.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from tunewright.config import (
    EVAL_METRICS,
    TuneRange,
    TunewrightConfig,
    config_to_dict,
    load_config,
    tune_metric,
    validate_config,
)
from tunewright.data import Dataset
from tunewright.errors import ConfigError, DataError, TrainingError
from tunewright.tables import as_frame, write_table
from tunewright.tune_devices import default_devices, run_workers

log = logging.getLogger(__name__)

STUDY_NAME = "tunewright"
STUDY_FILE = "study.db"
SEARCH_CONFIG = "search_config.yaml"  # what the workers of a several-device search read
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class TuneResult:
    """What `tune` returns: the best config written, its value and the study (every trial)."""

    best_config: Path
    best_value: float
    best_params: dict[str, Any]
    study: optuna.Study


def tune(config: str | Path | dict[str, Any] | TunewrightConfig, dataset: Dataset, output_dir: str | Path,
         trials: int, validation: Dataset | None = None, time_budget: float | None = None,
         show_progress: bool | None = None, devices: list[str] | None = None) -> TuneResult:
    """Search the config's `tune.space`, training one run per trial; write the best config, a table and a plot.

    Args:
        config: a config with a `tune:` section.
        dataset: the training data (split as `tunewright train` splits it).
        output_dir: the search folder: study.db, trials/, best_config.yaml, trials.csv, search.png.
        trials: the number of finished (complete or pruned) trials wanted in all, earlier runs included.
        validation: a separate validation file (else preprocessing.split's validation fraction).
        time_budget: stop starting new trials after this many seconds (Optuna's timeout).
        show_progress: as in `train`.
        devices: run trials in one worker process per device ('cpu', 'cuda:N'); None: every GPU when
            there are several, else this process.

    Raises:
        ConfigError: no `tune:` section, or a searched value the schema refuses.
        TrainingError: no trial completed.
    """
    base = load_config(config)
    if base.tune is None:
        raise ConfigError("tune: the config has no tune section; add tune.space with the settings to search")
    if validation is None and base.preprocessing.split_column is None and base.preprocessing.split[1] == 0:
        raise ConfigError("preprocessing.split: the search needs validation rows; give a validation fraction "
                          "or pass --validation")
    raw, space, metric = search_parts(base)
    check_space_values(raw, space)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    devices = default_devices(base.backend.device) if devices is None else devices
    study = open_study(folder, EVAL_METRICS[metric][0], base.trainer.seed, parallel=bool(devices))
    remaining = trials - finished_count(study)
    if remaining > 0 and devices:
        (folder / SEARCH_CONFIG).write_text(yaml.safe_dump(config_to_dict(base), sort_keys=False), encoding="utf-8")
        job = {"folder": str(folder.resolve()), "trials": trials, "time_budget": time_budget,
               "dataset": table_path(dataset, folder / "data" / "train.jsonl"),
               "validation": None if validation is None else table_path(validation, folder / "data" / "valid.jsonl")}
        run_workers(folder, devices, job, lambda: finished_count(study))
    elif remaining > 0:
        objective = trial_objective(raw, space, metric, dataset, validation, folder, show_progress)
        study.optimize(objective, n_trials=remaining, timeout=time_budget)
    write_trials_csv(study, folder / "trials.csv")
    write_search_report(study, metric, write_search_plot(study, metric, folder / "search.png"), folder)
    if not any(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials):
        raise TrainingError(f"{folder}: no trial completed (all pruned or failed); raise --trials or widen tune.space")
    best = study.best_trial
    best_values = decoded_params(best.params, space)
    best_config = trial_config_for(raw, space, best_values)
    best_path = folder / "best_config.yaml"
    resolved = {key: value for key, value in config_to_dict(best_config).items() if key != "tune"}
    best_path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    return TuneResult(best_path, float(best.value), best_values, study)  # type: ignore[arg-type]


def work_on_study(folder: Path, trials: int, device: str, worker: int, dataset: str, validation: str | None,
                  time_budget: float | None) -> None:
    """A worker of a several-device search (tune_devices.py): run trials on `device` until the study holds
    `trials` finished ones (workers that finish together may run one more each)."""
    base = load_config(folder / SEARCH_CONFIG)
    raw, space, metric = search_parts(base)
    raw["backend"] = {**raw["backend"], "device": "cpu" if device == "cpu" else "cuda"}  # its only visible GPU
    # Its own seed: workers sharing one would sample the same first values.
    study = open_study(folder, EVAL_METRICS[metric][0], base.trainer.seed + worker, parallel=True, retry_stale=False)
    if finished_count(study) >= trials:
        return
    objective = trial_objective(raw, space, metric, dataset, validation, folder, False, device)
    enough = optuna.study.MaxTrialsCallback(trials, states=FINISHED)
    study.optimize(objective, timeout=time_budget, callbacks=[enough])


def search_parts(base: TunewrightConfig) -> tuple[dict[str, Any], dict[str, TuneRange], str]:
    """What every trial starts from: the config without `tune:` as a dict, the space, and the metric."""
    assert base.tune is not None  # tune() checked it
    raw = {key: value for key, value in config_to_dict(base).items() if key != "tune"}
    return raw, base.tune.space, tune_metric(base)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def table_path(dataset: Dataset, path: Path) -> str:
    """A path the worker processes can read: the file given, or the rows written to `path`."""
    if isinstance(dataset, str | Path):
        return str(Path(dataset).resolve())
    path.parent.mkdir(exist_ok=True)
    write_table(as_frame(dataset)[0], path)
    return str(path.resolve())


def trial_objective(raw: dict[str, Any], space: dict[str, TuneRange], metric: str, dataset: Dataset,
                    validation: Dataset | None, folder: Path, show_progress: bool | None,
                    device: str | None = None) -> Any:
    """Optuna's objective: sample the space, train one run, return its validation metric."""

    def objective(trial: optuna.Trial) -> float:
        if device is not None:
            trial.set_user_attr("device", device)
        trial_config = trial_config_for(raw, space, {path: suggest(trial, path, span) for path, span in space.items()})
        return run_trial(trial, trial_config, metric, dataset, validation, folder, show_progress)

    return objective


def open_study(folder: Path, direction: str, seed: int, parallel: bool = False,
               retry_stale: bool = True) -> optuna.Study:
    """The study in folder/study.db, created or reopened; a trial left running by a stopped search is retried
    (not by a worker: the others' trials are running)."""
    # Several processes share the file: wait for its lock rather than fail at once.
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_FILE}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, load_if_exists=True,
        direction="maximize" if direction == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=parallel), pruner=optuna.pruners.MedianPruner(),
    )
    if retry_stale:  # no search is running: a trial still marked running was stopped with the search
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(stale.params)
    return study


def suggest(trial: optuna.Trial, path: str, span: TuneRange) -> Any:
    """Optuna's value for one setting. Choices that are lists are suggested as their JSON text."""
    if span.choices is not None:
        return trial.suggest_categorical(path, [encoded(choice) for choice in span.choices])
    assert span.low is not None and span.high is not None  # TuneRange checks it
    if span.is_integer:
        return trial.suggest_int(path, int(span.low), int(span.high), log=span.log)
    return trial.suggest_float(path, float(span.low), float(span.high), log=span.log)


def encoded(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list) else choice


def json_copy(value: Any) -> Any:
    """A deep copy of plain YAML data."""
    return json.loads(json.dumps(value))


def decoded_params(params: dict[str, Any], space: dict[str, TuneRange]) -> dict[str, Any]:
    """Optuna's stored params back as setting values (JSON text of list choices -> the list)."""
    values = {}
    for path, value in params.items():
        choices = space[path].choices if path in space else None
        values[path] = next((choice for choice in choices if encoded(choice) == value), value) if choices else value
    return values


def with_value(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `raw` with the dotted key path set to `value` (a missing section is created)."""
    copied: dict[str, Any] = json_copy(raw)
    section, *parents = copied, *path.split(".")[:-1]
    for part in parents:
        if section.get(part) is None:
            section[part] = {}
        section = section[part]
    section[path.split(".")[-1]] = json_copy(value)
    return copied


def trial_config_for(raw: dict[str, Any], space: dict[str, TuneRange], values: dict[str, Any]) -> TunewrightConfig:
    """The config of one set of values, validated by the schema; a refusal names the searched keys."""
    for path, value in values.items():
        raw = with_value(raw, path, decoded_params({path: value}, space)[path])
    try:
        return validate_config(raw)
    except ConfigError as error:
        shown = ", ".join(f"tune.space.{path}={value!r}" for path, value in values.items())
        reason = str(error).removeprefix("config: ")
        raise ConfigError(f"{shown}: the config these values make is invalid ({reason})") from None


def check_space_values(raw: dict[str, Any], space: dict[str, TuneRange]) -> None:
    """Before any trial: every bound and choice, set alone, is a value the setting accepts."""
    for path, span in space.items():
        for value in span.choices if span.choices is not None else (span.low, span.high):
            try:
                validate_config(with_value(raw, path, value))
            except ConfigError as error:
                reason = str(error).removeprefix("config: ")
                raise ConfigError(f"tune.space.{path}: the value {value!r} is refused ({reason})") from None


def run_trial(trial: optuna.Trial, config: TunewrightConfig, metric: str, dataset: Dataset,
              validation: Dataset | None, folder: Path, show_progress: bool | None) -> float:
    """Train one run; report each validation to the trial, which may prune (stop) it."""
    from tunewright.api import train

    def report(record: dict[str, Any]) -> None:
        value = record.get(f"val_{metric}")
        if value is None:  # a generated metric other than trainer.eval_metric: only the final value counts
            return
        trial.report(float(value), record["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned by tunewright tune at step {record['step']}: val_{metric} "
                                     f"{value:.4g} trails the median of earlier trials")

    run_dir = folder / "trials" / f"trial-{trial.number:03d}"
    result = train(config, dataset, run_dir, validation, overwrite=True, show_progress=show_progress,
                   on_validation=report)
    value = dict(result.metrics.get("validation", {})).get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{run_dir}: no finite validation {metric}; check that the validation rows have labels")
    return float(value)


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial: number, state, each param, value, seconds."""
    names = sorted({name for trial in study.trials for name in trial.params})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", *names, "value", "seconds", "device"])
        for trial in study.trials:
            seconds = trial.duration.total_seconds() if trial.duration is not None else None
            writer.writerow([trial.number, trial.state.name, *(trial.params.get(name) for name in names),
                             trial.value, seconds, trial.user_attrs.get("device", "")])


def write_search_plot(study: optuna.Study, metric: str, path: Path) -> str:
    """The metric of every completed trial, with the best so far as a line: a PNG, and the SVG returned."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from tunewright.report_plots import svg_text

    done = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    numbers, values = [trial.number for trial in done], [float(trial.value or 0.0) for trial in done]
    pick = max if EVAL_METRICS[metric][0] == "max" else min
    best_so_far = [pick(values[: index + 1]) for index in range(len(values))]
    with matplotlib.rc_context({"font.size": 9}):
        figure = Figure(figsize=(6, 3.5), layout="constrained")
        axes = figure.add_subplot()
        axes.scatter(numbers, values, label="trial")
        axes.step(numbers, best_so_far, where="post", color="tab:orange", label="best so far")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("trial")
        axes.set_ylabel(f"validation {metric}")
        axes.legend()
        figure.savefig(path, dpi=100)
        return svg_text(figure)


def write_search_report(study: optuna.Study, metric: str, plot_svg: str, folder: Path) -> None:
    """report.html for the search: the plot, every trial, and the best values (the run report's page style)."""
    from tunewright.report import figures, page, pairs, table

    names = sorted({name for trial in study.trials for name in trial.params})
    rows = [[trial.number, trial.state.name.lower(), *(trial.params.get(name, "") for name in names),
             "" if trial.value is None else trial.value] for trial in study.trials]
    sections = [
        ("search", "Search", figures([(f"Validation {metric} of each trial, and the best so far.", plot_svg)])),
        ("trials", "Trials", table(["trial", "state", *names, metric], rows, numeric=[0, len(names) + 2])),
    ]
    completed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        sections.append(("best", "Best trial", pairs([("trial", best.number), (metric, best.value),
                                                      *best.params.items()])))
    text = page(f"tunewright search: {folder.name}", f"{len(study.trials)} trials, by validation {metric}", sections)
    (folder / "report.html").write_text(text, encoding="utf-8")
