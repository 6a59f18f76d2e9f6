"""The config reference (docs/config.md), generated from the schema so it can never drift from the defaults."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tunewright.config import ServeSettings, TunewrightConfig

HEADER = """# Config reference

Every key of a tunewright YAML config, with its type, default and meaning. This page is generated from the
schema (`src/tunewright/config.py`) by `tunewright config --docs`; a test fails when it is stale.
Unknown keys are errors, so a typo never passes silently.
"""


def type_name(annotation: Any) -> str:
    """A short reader's name for a field's type: `linear | cosine`, `int or null`, `list of str`."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in arguments)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(argument) for argument in arguments if argument is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in arguments else "")
    if origin in (list, tuple):
        return f"list of {type_name(arguments[0])}" if arguments else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (its section below)"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return "see its section"
    if default is None:
        return "null"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, str) and "\n" in default:
        return f"`{json.dumps(default)}`"  # line breaks as YAML's double-quoted escapes: one table row
    return f"`{list(default) if isinstance(default, tuple) else default}`"


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The schema class a key holds, through `X | None` and `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = section_of(argument)
        if found is not None:
            return found
    return None


def section_table(path: str, model: type[BaseModel]) -> list[str]:
    lines = [f"## `{path}`", ""]
    if model.__doc__ and model.__doc__.strip() not in (BaseModel.__doc__ or "").strip():
        lines += [model.__doc__.strip().splitlines()[0], ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | {description} |")
    return [*lines, ""]


def nested_tables(prefix: str, model: type[BaseModel]) -> list[str]:
    """One table per section under `model` (and per section under those: `tracking.mlflow`)."""
    parts: list[str] = []
    for name, field in model.model_fields.items():
        section = section_of(field.annotation)
        if section is not None:
            label = prefix + (f"{name}[]" if typing.get_origin(field.annotation) is list else name)
            parts += [*section_table(label, section), *nested_tables(f"{label}.", section)]
    return parts


def config_reference() -> str:
    """docs/config.md: the top-level keys, then one table per section, then the server's settings."""
    parts = [HEADER, *section_table("(top level)", TunewrightConfig), *nested_tables("", TunewrightConfig)]
    parts += [
        "## `tunewright serve` options",
        "",
        "Not part of the YAML config: each is a `tunewright serve` option (`--max-batch-size` for `max_batch_size`).",
        "",
        *section_table("serve", ServeSettings)[4:],
    ]
    return "\n".join(parts).rstrip() + "\n"
