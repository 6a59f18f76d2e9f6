"""The command line: a thin typer app over the Python API. Errors become one stderr line + exit code."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup

from tunewright.errors import TunewrightError


class RenderErrors(TyperGroup):
    """Turns our errors into one stderr line and their exit code (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
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
    name="tunewright", cls=RenderErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune, evaluate and serve causal language models from one YAML file.",
)
console = Console(stderr=True)
state: dict[str, bool] = {"debug": False, "quiet": False}

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
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False,
) -> None:
    state.update(debug=debug, quiet=quiet)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO,
        format="%(message)s", handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True,
    )
    # transformers/accelerate info logs drown ours; keep their warnings.
    for noisy in ("transformers", "accelerate", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int | str):
            table.add_row(key, str(value))
    Console().print(table)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Check a config without loading any model."""
    from tunewright.config import load_config

    load_config(config)
    Console().print(f"{config}: valid")


@app.command()
def train(
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
    from tunewright import api

    result = api.train(config, dataset, output_dir, validation, overwrite, show_progress=not state["quiet"],
                       from_run=from_run, resume=resume, trust_remote_code=trust_remote_code or None)
    for split_name in ("validation", "test"):
        if split_name in result.metrics:
            print_metrics(f"{split_name} metrics", result.metrics[split_name])
    Console().print(f"run folder: {result.run_dir}")


def _model_for(model: Path | None, config: Path | None, trust_remote_code: bool) -> Any:
    from tunewright import api

    if (model is None) == (config is None):
        raise TunewrightError("pass exactly one of --model RUN_FOLDER or --config CONFIG (zero-shot)")
    trust = trust_remote_code or None  # not passed: TUNEWRIGHT_TRUST_REMOTE_CODE decides
    if model is not None:
        return api.load(model, trust)
    return api.from_config(config, trust)  # type: ignore[arg-type]


@app.command()
def predict(
    dataset: DatasetOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="Predictions file (.csv, .jsonl, .parquet).")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
    all_probabilities: Annotated[
        bool, typer.Option("--all-probabilities", help="Category outputs: add a probability_<label> column per label.")
    ] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Write the input rows plus a `prediction` column (categories: and `prediction_probability`)."""
    from tunewright import api

    if output.suffix.lower() not in (".csv", ".jsonl", ".parquet"):
        raise TunewrightError(f"{output}: unknown output type '{output.suffix}'; use .csv, .jsonl or .parquet")
    tuned = _model_for(model, config, trust_remote_code)
    frame = api.predict(tuned, dataset, output, show_progress=not state["quiet"], all_probabilities=all_probabilities)
    Console().print(f"wrote {len(frame)} predictions to {output}")


@app.command()
def evaluate(
    dataset: DatasetOption,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Metrics JSON file (categories: the confusion matrix goes beside it as .png)."
    )] = None,
    predictions: Annotated[Path | None, typer.Option(help="Also write the predictions here.")] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Print (and optionally write) metrics on a labelled dataset."""
    from tunewright import api

    tuned = _model_for(model, config, trust_remote_code)
    metrics = api.evaluate(tuned, dataset, output, predictions, show_progress=not state["quiet"])
    print_metrics("metrics", metrics)
    if output is None:
        Console().print_json(json.dumps(metrics))


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Run folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    merge: Annotated[bool, typer.Option(
        "--merge", help="Merge the adapter into the weights: a plain transformers model folder."
    )] = False,
    dtype: Annotated[str | None, typer.Option(help="Cast weights: float32, bfloat16 or float16.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Export a run: a plain Hugging Face model folder (--merge, or full fine-tunes) or the adapter alone."""
    from tunewright.export import export_run

    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise TunewrightError(f"--dtype: unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    folder = export_run(model, output, merge, dtype, overwrite, trust_remote_code or None)  # type: ignore[arg-type]
    Console().print(f"exported to {folder}")


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
            Console().print(f"{kind}: {name}", highlight=False, soft_wrap=True)
    Console().print(f"sealed {run}")


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _serve_help(name: str) -> str:
    from tunewright.config import ServeSettings

    field = ServeSettings.model_fields[name]
    return f"{field.description} (default: {field.default})"


@app.command()
def serve(
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
    request_timeout_s: Annotated[float | None, typer.Option(
        "--request-timeout", help=_serve_help("request_timeout_s"))] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="TUNEWRIGHT_API_KEY", show_envvar=True, help=_serve_help("api_key"))] = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Serve runs over an OpenAI-compatible HTTP API (completions, chat completions, /predict)."""
    import signal

    import pydantic
    import uvicorn

    from tunewright.config import ServeSettings
    from tunewright.serving.app import create_app
    from tunewright.serving.pool import load_models

    options = {"host": host, "port": port, "max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms,
               "max_tokens": max_tokens, "max_body_bytes": max_body_bytes, "api_key": api_key,
               "max_concurrent_requests": max_concurrent_requests, "request_timeout_s": request_timeout_s}
    try:
        settings = ServeSettings(**{name: value for name, value in options.items() if value is not None})
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        raise TunewrightError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    models = load_models(model or [], config or [], trust_remote_code or None)
    console.print(f"serving {', '.join(models)} on http://{settings.host}:{settings.port}", highlight=False)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish, runs the app's shutdown and
    # then re-raises the signal; this handler turns that last step into a clean exit (status 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(create_app(models, settings), host=settings.host, port=settings.port,
                log_level="warning" if state["quiet"] else "info",
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
