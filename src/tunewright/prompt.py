"""Prompt templates: `{column}` placeholders rendered from a data row (pure functions)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any


def template_fields(template: str) -> list[str]:
    """Names of the `{placeholders}` in a template, in order of first use.

    Raises:
        ValueError: the template is not a valid format string (for example an unclosed brace).
    """
    names: list[str] = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        # Attribute and index lookups ({a.b}, {a[0]}) would let a template reach into objects.
        if field_name == "" or any(char in field_name for char in ".[]"):
            raise ValueError(f"placeholder {{{field_name}}} is not a column name")
        if field_name not in names:
            names.append(field_name)
    return names


def default_template(input_columns: Sequence[str]) -> str:
    """The template used when the config gives none: the single column, or `name: value` lines."""
    if len(input_columns) == 1:
        return "{" + input_columns[0] + "}"
    return "\n".join(f"{name}: {{{name}}}" for name in input_columns)


def render_prompt(template: str, row: Mapping[str, Any], task: str | None = None) -> str:
    """Fill a template from one row; a `task` text, when given, goes first on its own line."""
    values = {name: "" if row[name] is None else str(row[name]) for name in template_fields(template)}
    body = template.format(**values)
    return f"{task}\n{body}" if task else body
