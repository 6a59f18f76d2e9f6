"""Writing a benchmark's JSON result where `--out` points (the folder is created if missing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(result: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
