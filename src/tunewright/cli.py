"""The command line: a thin typer app over the Python API. Errors become one stderr line + exit code."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

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
) -> None:
    """Fine-tune a model (or set up zero-shot) and write a run folder."""
    from tunewright import api

    result = api.train(config, dataset, output_dir, validation, overwrite, show_progress=not state["quiet"])
    for split_name in ("validation", "test"):
        if split_name in result.metrics:
            print_metrics(f"{split_name} metrics", result.metrics[split_name])
    Console().print(f"run folder: {result.run_dir}")


def _model_for(model: Path | None, config: Path | None) -> Any:
    from tunewright import api

    if (model is None) == (config is None):
        raise TunewrightError("pass exactly one of --model RUN_FOLDER or --config CONFIG (zero-shot)")
    return api.load(model) if model is not None else api.from_config(config)  # type: ignore[arg-type]


@app.command()
def predict(
    dataset: DatasetOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="Predictions file (.csv, .jsonl, .parquet).")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
) -> None:
    """Write the input rows plus a `prediction` column."""
    from tunewright import api

    if output.suffix.lower() not in (".csv", ".jsonl", ".parquet"):
        raise TunewrightError(f"{output}: unknown output type '{output.suffix}'; use .csv, .jsonl or .parquet")
    tuned = _model_for(model, config)
    frame = api.predict(tuned, dataset, output, show_progress=not state["quiet"])
    Console().print(f"wrote {len(frame)} predictions to {output}")


@app.command()
def evaluate(
    dataset: DatasetOption,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Run folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config for zero-shot use.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Metrics JSON file.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Also write the predictions here.")] = None,
) -> None:
    """Print (and optionally write) metrics on a labelled dataset."""
    from tunewright import api

    tuned = _model_for(model, config)
    metrics = api.evaluate(tuned, dataset, output, predictions, show_progress=not state["quiet"])
    print_metrics("metrics", metrics)
    if output is None:
        Console().print_json(json.dumps(metrics))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
