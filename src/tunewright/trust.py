"""Whether remote code (a model's or tokenizer's `auto_map` to Python files) may run.

Only the person running the command decides: `--trust-remote-code` on the command line, the
`trust_remote_code` argument of the Python API, or TUNEWRIGHT_TRUST_REMOTE_CODE=1 in the
environment. A run folder's saved `config.yaml` never does: whoever can write to a shared or
downloaded run folder could otherwise make loading it run their code.
"""

from __future__ import annotations

import os

from tunewright.config import BackendConfig

TRUST_ENV = "TUNEWRIGHT_TRUST_REMOTE_CODE"
# Pickle weights can run code when loaded, so a run folder's saved backend.allow_pickle_weights is ignored too.
PICKLE_ENV = "TUNEWRIGHT_ALLOW_PICKLE_WEIGHTS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def remote_code_trusted(trust_remote_code: bool | None = None) -> bool:
    """The person's choice: the argument when given (True or False), else the environment variable."""
    if trust_remote_code is not None:
        return trust_remote_code
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


def pickle_weights_allowed() -> bool:
    """The person's choice for loading a saved run whose base model has only pickle weights."""
    return os.environ.get(PICKLE_ENV, "").strip().lower() in _TRUE


def saved_run_backend(backend: BackendConfig, trust_remote_code: bool | None = None) -> BackendConfig:
    """A saved run's backend with every code-running permission replaced by the person's own choice."""
    return backend.model_copy(update={
        "trust_remote_code": remote_code_trusted(trust_remote_code), "allow_pickle_weights": pickle_weights_allowed(),
    })


def with_trust(backend: BackendConfig, trusted: bool) -> BackendConfig:
    """A copy of `backend` whose trust_remote_code is exactly `trusted`."""
    return backend.model_copy(update={"trust_remote_code": trusted})
