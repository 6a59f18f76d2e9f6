"""Prompt templates: `{column}` placeholders rendered from a data row (pure functions).

A template holds plain `{column}` placeholders only. Python's format mini-language would let a
template nest fields in a format spec (`{a:{b}}`), pad a value to any width (`{a:>99999999}`),
convert it (`{a!r}`) or reach into objects (`{a.b}`, `{a[0]}`); none of that is needed for text,
so all of it is refused when the config is validated, and rendering never calls `str.format`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any


def _placeholder(field_name: str, format_spec: str | None, conversion: str | None) -> str:
    """The placeholder as written, for messages."""
    shown = field_name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "")
    return "{" + shown + "}"


@lru_cache(maxsize=64)
def template_parts(template: str) -> tuple[tuple[str, str | None], ...]:
    """The template as (literal text, column or None) pairs, checked to hold plain placeholders only.

    Raises:
        ValueError: an unclosed brace, or a placeholder that is not a plain `{column}`.
    """
    parts: list[tuple[str, str | None]] = []
    for literal, field_name, format_spec, conversion in string.Formatter().parse(template):
        if field_name is not None:
            shown = _placeholder(field_name, format_spec, conversion)
            if field_name == "" or any(char in field_name for char in ".[]"):
                raise ValueError(f"placeholder {shown} is not a column name; write {{column}}")
            if format_spec and "{" in format_spec:
                raise ValueError(f"placeholder {shown} nests a field in a format spec; write {{{field_name}}}")
            if format_spec or conversion:
                raise ValueError(
                    f"placeholder {shown} has a format spec or conversion; write {{{field_name}}} "
                    "(double a brace, {{ or }}, to write it literally)"
                )
        parts.append((literal, field_name))
    return tuple(parts)


def template_fields(template: str) -> list[str]:
    """Names of the `{placeholders}` in a template, in order of first use.

    Raises:
        ValueError: the template is not valid (see `template_parts`).
    """
    names: list[str] = []
    for _, field_name in template_parts(template):
        if field_name is not None and field_name not in names:
            names.append(field_name)
    return names


def default_template(input_columns: Sequence[str]) -> str:
    """The template used when the config gives none: the single column, or `name: value` lines."""
    if len(input_columns) == 1:
        return "{" + input_columns[0] + "}"
    return "\n".join(f"{name}: {{{name}}}" for name in input_columns)


def render_prompt(template: str, row: Mapping[str, Any], task: str | None = None) -> str:
    """Fill a template from one row; a `task` text, when given, goes first on its own line."""
    pieces = []
    for literal, field_name in template_parts(template):
        pieces.append(literal)
        if field_name is not None:
            value = row[field_name]
            pieces.append("" if value is None else str(value))
    return with_task("".join(pieces), task)


def with_task(body: str, task: str | None) -> str:
    """The `task` text, when given, on its own line before the rendered prompt."""
    return f"{task}\n{body}" if task else body
