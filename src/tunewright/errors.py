"""User-facing errors: raised by the library, rendered by the CLI as one line.

Exit codes: 1 any other error of ours, 2 a usage error (a bad or missing flag: click's own code),
3 data, 4 model loading, 5 run folder, 6 training fault, 7 config, 128 + N a signal.
"""

from __future__ import annotations


class TunewrightError(Exception):
    """Base of every error a user can cause and fix; the CLI prints it without a traceback."""

    exit_code = 1


class ConfigError(TunewrightError):
    """The YAML config (or dict) is invalid; the message names the key path."""

    exit_code = 7  # not 2: click exits 2 for usage errors (a bad flag), and scripts tell the two apart


class DataError(TunewrightError):
    """A dataset file or column is missing, empty or malformed; the message names it."""

    exit_code = 3


class ModelLoadError(TunewrightError):
    """The base model or a saved model could not be loaded."""

    exit_code = 4


class RunFolderError(TunewrightError):
    """A run folder is missing, incomplete or inconsistent."""

    exit_code = 5


class TrainingError(TunewrightError):
    """Training stopped on a fault (non-finite loss, out of memory)."""

    exit_code = 6


class ExportError(TunewrightError):
    """An export tool failed: llama.cpp's converter could not be fetched, or it refused the model."""

    exit_code = 8


class TrainingInterrupted(TrainingError):
    """SIGTERM or Ctrl-C stopped training after a checkpoint was saved; the exit code is 128 + the signal."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
