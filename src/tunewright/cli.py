"""The command line: a thin typer app over the Python API. Errors become one stderr line + exit code.

stdout carries only what a script reads: evaluate's metrics JSON, validate's verdict and seal's list
of changes. Tables, progress bars, logs and errors go to stderr, so `tunewright evaluate ... | jq .`
works. torch and transformers are imported inside the commands that load a model, so --help,
--version and validate start in well under a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup

from tunewright.errors import TunewrightError

TABLE_TYPES = (".csv", ".jsonl", ".parquet")
GLOBAL_FLAGS = ("debug", "quiet")


def configure_logging() -> None:
    """Our logs go to stderr; --debug shows debug logs, --quiet only warnings and errors."""
    level = logging.DEBUG if state["debug"] else logging.WARNING if state["quiet"] else logging.INFO
    logging.basicConfig(
        level=level, format="%(message)s", force=True,
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    # The libraries' info logs drown ours (absl: rouge-score's "Using default tokenizer"); keep their
    # warnings (--quiet drops those too, see _api).
    for noisy in ("transformers", "accelerate", "peft", "httpx", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _remember_flag(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> None:
    # Before the verb (the root context) the flag sets the state for this invocation; after it, it can
    # only turn the flag on, so `tunewright --quiet train ...` and `tunewright train ... --quiet` agree.
    if value or ctx.parent is None:
        state[str(param.name)] = value
        configure_logging()


class RenderErrors(TyperGroup):
    """Turns our errors into one stderr line and their exit code (a traceback only with --debug).

    Every command also takes the global flags (--debug, --quiet), so they work after the verb too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        flags = [param for param in self.params if param.name in GLOBAL_FLAGS]
        for command in self.commands.values():
            command.params.extend(flags)

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # click's own Context is private
        try:
            return super().invoke(ctx)
        except TunewrightError as error:
            if state["debug"]:
                raise
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            ctx.exit(130)


app = typer.Typer(
    name="tunewright", cls=RenderErrors, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune, evaluate and serve causal language models from one YAML file.",
)
console = Console(stderr=True)
state: dict[str, bool] = {"debug": False, "quiet": False}


def _show_version(value: bool) -> None:
    if value:
        from tunewright import __version__

        typer.echo(f"tunewright {__version__}")
        raise typer.Exit()


def _table_file(value: Path | None) -> Path | None:
    """Checked as the flags are read, so a typo fails before any model loads."""
    if value is not None and value.suffix.lower() not in TABLE_TYPES:
        raise typer.BadParameter(f"{value}: unknown file type '{value.suffix}'; use .csv, .jsonl or .parquet")
    return value


def _json_file(value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() != ".json":
        raise typer.BadParameter(f"{value}: metrics are written as JSON; use a .json file name")
    return value


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
DatasetOption = Annotated[Path, typer.Option("--dataset", "-d", help="CSV, JSONL or Parquet file.")]
# Only the person running the command can let model code run: a run folder's saved config never can.
TrustOption = Annotated[bool, typer.Option(
    "--trust-remote-code",
    help="Let the model's or tokenizer's own Python code run (auto_map); only for sources you trust. "
    "Also TUNEWRIGHT_TRUST_REMOTE_CODE=1. A run folder's saved backend.trust_remote_code is ignored.",
)]


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", callback=_remember_flag, expose_value=False, help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", callback=_remember_flag, expose_value=False,
        help="No progress bars, tables or info logs; no loading bars or warnings from transformers, peft or the Hub.",
    )] = False,
) -> None:
    """The flags' callbacks do the work; RenderErrors gives every command --debug and --quiet as well."""


def _api(ctx: typer.Context) -> ModuleType:
    """The Python API, imported only by commands that load a model (torch and transformers take seconds)."""
    from tunewright import api

    _quiet_if_asked(ctx)
    return api


def _quiet_if_asked(ctx: typer.Context) -> None:
    """With --quiet, transformers', peft's and the Hub's bars, logs and warnings are off until the command ends."""
    if state["quiet"]:
        from tunewright.progress import quiet_libraries

        ctx.with_resource(quiet_libraries())


def _one_model_source(model: Path | None, config: Path | None) -> None:
    if (model is None) == (config is None):
        raise typer.BadParameter("pass exactly one (a run folder, or a config for zero-shot use)",
                                 param_hint="'--model' / '--config'")


def _show_progress() -> bool | None:
    return False if state["quiet"] else None  # None: bars (on stderr) when stderr is a terminal


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    """A table of the flat metrics, on stderr (nested ones are in the JSON); none with --quiet."""
    if state["quiet"]:
        return
    table = Table(title=title, show_header=False)
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int | str):
            table.add_row(key, str(value))
    console.print(table)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Check a config without loading any model."""
    from tunewright.config import load_config

    load_config(config)
    typer.echo(f"{config}: valid")


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Argument(help="YAML config file to print fully resolved.")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="Print the reference of every key (docs/config.md).")] = False,
) -> None:
    """Print a config with every default filled in, or (--docs) the reference of every key."""
    if (config is None) == (not docs):
        raise typer.BadParameter("pass a config file, or --docs for the reference", param_hint="CONFIG / --docs")
    if docs:
        from tunewright.config_docs import config_reference

        typer.echo(config_reference(), nl=False)
        return
    import yaml

    from tunewright.config import config_to_dict, load_config

    typer.echo(yaml.safe_dump(config_to_dict(load_config(config)), sort_keys=False), nl=False)


@app.command()
def train(
    ctx: typer.Context,
    config: ConfigOption,
    dataset: DatasetOption,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Run folder to write.")],
    validation: Annotated[Path | None, typer.Option(help="Separate validation file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    from_run: Annotated[Path | None, typer.Option(
        "--from-run", help="Continue training this run's adapter (or full weights) on the new dataset."
    )] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the unfinished run in --output-dir from its newest checkpoint (bit-exact)."
    )] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Fine-tune a model (or set up zero-shot) and write a run folder."""
    result = _api(ctx).train(config, dataset, output_dir, validation, overwrite, show_progress=_show_progress(),
                          from_run=from_run, resume=resume, trust_remote_code=trust_remote_code or None)
    for split_name in ("validation", "test"):
        if split_name in result.metrics:
            print_metrics(f"{split_name} metrics", result.metrics[split_name])
    console.print(f"run folder: {result.run_dir}", highlight=False, soft_wrap=True)
    if not state["quiet"] and (result.run_dir / "report.html").is_file():
        console.print(f"report: {result.run_dir / 'report.html'}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    ctx: typer.Context,
    config: ConfigOption,
    dataset: DatasetOption,
    rows: Annotated[int, typer.Option("--rows", "-n", min=0, help="Rows to show highlighted.")] = 3,
) -> None:
    """Show which tokens train (highlighted) in the first rows, and count rows the masks leave empty."""
    _quiet_if_asked(ctx)
    from tunewright.mask_lint import inspect_dataset, inspection_view

    inspection = inspect_dataset(config, dataset)
    out = Console(soft_wrap=True)
    out.print(inspection_view(inspection, rows, marks=not out.is_terminal), highlight=False)


@app.command()
def tune(
    ctx: typer.Context,
    config: ConfigOption,
    dataset: DatasetOption,
    trials: Annotated[int, typer.Option(min=1, help="Finished trials wanted in all (a resumed search counts its "
                                        "earlier ones).")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Search folder (resumed if it exists).")],
    validation: Annotated[Path | None, typer.Option(help="Separate validation file.")] = None,
    time_budget: Annotated[float | None, typer.Option(
        "--time-budget", min=0, help="Start no new trial after this many seconds.")] = None,
    devices: Annotated[str | None, typer.Option(
        help="Run trials in one process per device, e.g. 0,1 (CUDA indices) or cpu,cpu; default: every GPU "
        "when there are several, else one process.")] = None,
) -> None:
    """Search the config's tune: section with Optuna; print the best config's path."""
    _api(ctx)  # --quiet applies to the trials' libraries too
    from tunewright.tune import tune as search
    from tunewright.tune_devices import parse_devices

    chosen = parse_devices(devices) if devices is not None else None
    result = search(config, dataset, output_dir, trials, validation, time_budget, show_progress=_show_progress(),
                    devices=chosen)
    if not state["quiet"]:
        table = Table(title=f"trials (best: {result.best_value:.4f})")
        for column in ("trial", "state", "value", "params"):
            table.add_column(column)
        for trial in result.study.trials:
            value = "" if trial.value is None else f"{trial.value:.4f}"
            params = ", ".join(f"{name}={param}" for name, param in trial.params.items())
            table.add_row(str(trial.number), trial.state.name.lower(), value, params)
        console.print(table)
    typer.echo(str(result.best_config))


def _model_for(api: ModuleType, model: Path | None, config: Path | None, trust_remote_code: bool) -> Any:
    trust = trust_remote_code or None  # not passed: TUNEWRIGHT_TRUST_REMOTE_CODE decides
    if model is not None:
        return api.load(model, trust)
    return api.from_config(config, trust)


@app.command()
def predict(
    ctx: typer.Context,
    dataset: DatasetOption,
    output: Annotated[Path, typer.Option(
        "--output", "-o", callback=_table_file, help="Predictions file (.csv, .jsonl, .parquet).")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
    all_probabilities: Annotated[
        bool, typer.Option("--all-probabilities", help="Category outputs: add a probability_<label> column per label.")
    ] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Write the input rows plus a `prediction` column (categories: and `prediction_probability`)."""
    _one_model_source(model, config)
    api = _api(ctx)
    tuned = _model_for(api, model, config, trust_remote_code)
    frame = api.predict(tuned, dataset, output, show_progress=_show_progress(), all_probabilities=all_probabilities)
    console.print(f"wrote {len(frame)} predictions to {output}", highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    ctx: typer.Context,
    dataset: DatasetOption,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", callback=_json_file,
        help="Also write the metrics to this .json file (categories: the confusion matrix goes beside it as .png)."
    )] = None,
    predictions: Annotated[Path | None, typer.Option(
        callback=_table_file, help="Also write the predictions here (.csv, .jsonl, .parquet).")] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Print the metrics on a labelled dataset as JSON on stdout (and a table on stderr)."""
    _one_model_source(model, config)
    api = _api(ctx)
    tuned = _model_for(api, model, config, trust_remote_code)
    metrics = api.evaluate(tuned, dataset, output, predictions, show_progress=_show_progress())
    print_metrics("metrics", metrics)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def export(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option("--model", "-m", help="Run folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    merge: Annotated[bool, typer.Option(
        "--merge", help="Merge the adapter into the weights: a plain transformers model folder."
    )] = False,
    # The same choices as tunewright.export.ExportDtype, which cannot be imported here without torch.
    dtype: Annotated[Literal["float32", "bfloat16", "float16"] | None, typer.Option(help="Cast the weights.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    trust_remote_code: TrustOption = False,
    # The same choices as tunewright.gguf_export.ExportFormat / Quantization.
    format: Annotated[Literal["hf", "gguf", "ollama"], typer.Option(
        "--format", help="hf: a Hugging Face folder; gguf: one .gguf file for llama.cpp; ollama: the .gguf "
        "and a Modelfile."
    )] = "hf",
    quantization: Annotated[Literal["f32", "f16", "bf16", "q8_0"] | None, typer.Option(
        help="GGUF tensor type (--format gguf/ollama; default f16)."
    )] = None,
) -> None:
    """Export a run: a Hugging Face model folder (--merge, or full fine-tunes), the adapter alone, or GGUF."""
    if merge and format != "hf":
        raise typer.BadParameter("a GGUF export is always merged; drop --merge", param_hint="--merge")
    folder = _api(ctx).export(model, output, merge, dtype, overwrite, trust_remote_code or None, format, quantization)
    console.print(f"exported to {folder}", highlight=False, soft_wrap=True)


@app.command()
def seal(run: Annotated[Path, typer.Argument(help="Complete run folder.")]) -> None:
    """Record the SHA-256 of every file a run folder's loading reads, after you changed the folder on purpose.

    Loading refuses a run whose files changed, went missing or were added since training. Sealing
    says the folder as it is now is what you want; it does not let its code run (--trust-remote-code).
    """
    from tunewright.run import seal_run

    changes = seal_run(run)
    for kind, names in changes.items():
        for name in names:
            typer.echo(f"{kind}: {name}")
    console.print(f"sealed {run}", highlight=False, soft_wrap=True)


@app.command()
def report(run: Annotated[Path, typer.Argument(help="Complete run folder.")]) -> None:
    """Write the run folder's report.html again: curves, metrics, predictions, config and hardware."""
    from tunewright.report import write_report

    console.print(f"wrote {write_report(run)}", highlight=False, soft_wrap=True)


def _html_file(value: Path) -> Path:
    if value.suffix.lower() not in (".html", ".htm"):
        raise typer.BadParameter(f"{value}: the comparison is a web page; use a .html file name")
    return value


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more complete run folders.")],
    output: Annotated[Path, typer.Option("--output", "-o", callback=_html_file, help="The page to write (.html).")],
) -> None:
    """Write one page comparing runs: configs diffed, metrics side by side, curves overlaid."""
    if len(runs) < 2:
        raise typer.BadParameter("pass two or more run folders to compare", param_hint="RUNS")
    from tunewright.compare import compare_runs

    console.print(f"wrote {compare_runs(runs, output)}", highlight=False, soft_wrap=True)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _serve_help(name: str) -> str:
    from tunewright.config import ServeSettings

    field = ServeSettings.model_fields[name]
    return f"{field.description} (default: {field.default})"


@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Run folder, or NAME=RUN_FOLDER; repeat to serve several.")] = None,
    config: Annotated[list[str] | None, typer.Option(
        "--config", "-c", help="Zero-shot config, or NAME=CONFIG; repeatable.")] = None,
    host: Annotated[str | None, typer.Option(help=_serve_help("host"))] = None,
    port: Annotated[int | None, typer.Option(help=_serve_help("port"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_serve_help("max_batch_size"))] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help=_serve_help("batch_wait_ms"))] = None,
    max_tokens: Annotated[int | None, typer.Option(help=_serve_help("max_tokens"))] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help=_serve_help("max_body_bytes"))] = None,
    max_concurrent_requests: Annotated[int | None, typer.Option(
        help=_serve_help("max_concurrent_requests"))] = None,
    max_predict_rows: Annotated[int | None, typer.Option(help=_serve_help("max_predict_rows"))] = None,
    max_connections: Annotated[int | None, typer.Option(help=_serve_help("max_connections"))] = None,
    request_timeout_s: Annotated[float | None, typer.Option(
        "--request-timeout", help=_serve_help("request_timeout_s"))] = None,
    read_timeout_s: Annotated[float | None, typer.Option(
        "--read-timeout", help=_serve_help("read_timeout_s"))] = None,
    send_timeout_s: Annotated[float | None, typer.Option(
        "--send-timeout", help=_serve_help("send_timeout_s"))] = None,
    allowed_hosts: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help=f"Repeatable. {_serve_help('allowed_hosts')}")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="TUNEWRIGHT_API_KEY", show_envvar=True, help=_serve_help("api_key"))] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Serve runs over an OpenAI-compatible HTTP API (completions, chat completions, /predict)."""
    import os
    import signal

    import pydantic
    import uvicorn

    from tunewright.config import ServeSettings
    from tunewright.serving.app import create_app
    from tunewright.serving.connections import uvicorn_config
    from tunewright.serving.pool import load_models

    if api_key is None and os.environ.get("TUNEWRIGHT_API_KEY", "unset").strip() == "":
        # click reads an empty variable as unset, which would serve with no key at all
        raise TunewrightError("TUNEWRIGHT_API_KEY is set but empty; set it to a key, or unset it to serve without one")
    options = {name: value for name, value in locals().items() if name in ServeSettings.model_fields}
    _quiet_if_asked(ctx)
    try:
        settings = ServeSettings(**{name: value for name, value in options.items() if value is not None})
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        flag = {"request_timeout_s": "request-timeout", "read_timeout_s": "read-timeout",
                "send_timeout_s": "send-timeout", "allowed_hosts": "allowed-host"}.get(str(first["loc"][0]))
        raise TunewrightError(
            f"--{flag or str(first['loc'][0]).replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
    models = load_models(model or [], config or [], trust_remote_code or None)
    console.print(f"serving {', '.join(models)} on http://{settings.host}:{settings.port}", highlight=False)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish, runs the app's shutdown and
    # then re-raises the signal; this handler turns that last step into a clean exit (status 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    log_level = "warning" if state["quiet"] else "info"
    phases = logging.getLogger("tunewright.phases")  # a request's work is not a phase worth a line
    ctx.call_on_close(lambda level=phases.level: phases.setLevel(level))
    phases.setLevel(logging.WARNING)
    uvicorn.Server(uvicorn_config(create_app(models, settings), settings, log_level)).run()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
