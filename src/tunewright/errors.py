"""User-facing errors: raised by the library, rendered by the CLI as one line."""

from __future__ import annotations


class TunewrightError(Exception):
    """Base of every error a user can cause and fix; the CLI prints it without a traceback."""

    exit_code = 1


class ConfigError(TunewrightError):
    """The YAML config (or dict) is invalid; the message names the key path."""

    exit_code = 2


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


class TrainingInterrupted(TrainingError):
    """SIGTERM or Ctrl-C stopped training after a checkpoint was saved; the exit code is 128 + the signal."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
