"""tunewright: declarative fine-tuning, evaluation and serving of causal language models.

The public API has the same verbs as the CLI::

    import tunewright
    run = tunewright.train("config.yaml", "data.csv", "runs/demo")
    model = tunewright.load("runs/demo")
    predictions = tunewright.predict(model, "new.csv")
    metrics = tunewright.evaluate(model, "test.csv")
    tunewright.export(model, "exported", merge=True)
    search = tunewright.tune("config.yaml", "data.csv", "search", trials=20)

Names are imported on first use (PEP 562), so `import tunewright` and the CLI's --help do not
load torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_PUBLIC = {
    "train": "tunewright.api",
    "load": "tunewright.api",
    "from_config": "tunewright.api",
    "predict": "tunewright.api",
    "evaluate": "tunewright.api",
    "export": "tunewright.api",
    "tune": "tunewright.tune",
    "TrainResult": "tunewright.api",
    "EvaluationMetrics": "tunewright.api",
    "TunedModel": "tunewright.predictor",
    "load_config": "tunewright.config",
    "TunewrightError": "tunewright.errors",
}

__all__ = [
    "EvaluationMetrics", "TrainResult", "TunedModel", "TunewrightError", "__version__", "evaluate", "export",
    "from_config", "load", "load_config", "predict", "train", "tune",
]

if TYPE_CHECKING:
    from tunewright.api import EvaluationMetrics, TrainResult, evaluate, export, from_config, load, predict, train
    from tunewright.config import load_config
    from tunewright.errors import TunewrightError
    from tunewright.predictor import TunedModel
    from tunewright.tune import tune


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata alone takes a tenth of a second to import
        from importlib.metadata import version

        globals()[name] = version("tunewright")
        return globals()[name]
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tunewright' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing the submodule `tunewright.export` must not replace the `export` verb.

    The import system sets a package attribute for each submodule it loads; with the verbs loaded
    lazily, `tunewright.export` would otherwise become the module whenever it was imported first.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
