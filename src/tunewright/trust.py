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
_TRUE = frozenset({"1", "true", "yes", "on"})


def remote_code_trusted(trust_remote_code: bool | None = None) -> bool:
    """The person's choice: the argument when given (True or False), else the environment variable."""
    if trust_remote_code is not None:
        return trust_remote_code
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


def with_trust(backend: BackendConfig, trusted: bool) -> BackendConfig:
    """A copy of `backend` whose trust_remote_code is exactly `trusted`."""
    return backend.model_copy(update={"trust_remote_code": trusted})
