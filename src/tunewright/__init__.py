"""tunewright: declarative fine-tuning, evaluation and serving of causal language models.

The public API has the same verbs as the CLI::

    import tunewright
    run = tunewright.train("config.yaml", "data.csv", "runs/demo")
    model = tunewright.load("runs/demo")
    predictions = tunewright.predict(model, "new.csv")
    metrics = tunewright.evaluate(model, "test.csv")
"""

from importlib.metadata import version

__version__ = version("tunewright")

from tunewright.api import evaluate, from_config, load, predict, train  # noqa: E402
from tunewright.export import export_run as export  # noqa: E402

__all__ = ["__version__", "evaluate", "export", "from_config", "load", "predict", "train"]
