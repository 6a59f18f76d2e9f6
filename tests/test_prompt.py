from __future__ import annotations

import pytest

from tunewright.prompt import default_template, render_prompt, template_fields


def test_template_fields_in_order_without_repeats() -> None:
    assert template_fields("{b} and {a} then {b}") == ["b", "a"]


def test_escaped_braces_are_not_fields() -> None:
    assert template_fields("json {{x}}: {value}") == ["value"]


@pytest.mark.parametrize("template", ["{a.b}", "{a[0]}", "{}", "{unclosed"])
def test_invalid_placeholders_are_refused(template: str) -> None:
    with pytest.raises(ValueError):
        template_fields(template)


def test_render_with_task_and_missing_values() -> None:
    assert render_prompt("Q: {q}\nA:", {"q": "why?"}, task="Answer briefly.") == "Answer briefly.\nQ: why?\nA:"
    assert render_prompt("[{q}]", {"q": None}) == "[]"


def test_default_template() -> None:
    assert default_template(["text"]) == "{text}"
    assert default_template(["title", "body"]) == "title: {title}\nbody: {body}"


@pytest.mark.parametrize(("template", "fragment"), [
    ("{word:{x}}", "placeholder {word:{x}} nests a field in a format spec; write {word}"),
    ("{word:>99999999}", "placeholder {word:>99999999} has a format spec or conversion; write {word}"),
    ("{word!r}", "placeholder {word!r} has a format spec or conversion"),
    ("{word!s:^9}", "placeholder {word!s:^9} has a format spec or conversion"),
])
def test_format_specs_and_conversions_are_refused(template: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="placeholder") as caught:
        template_fields(template)
    assert fragment in str(caught.value)


def test_rendering_never_formats_values() -> None:
    """Values are pasted as text: braces in them stay, and a column named like an index works."""
    assert render_prompt("{0} and {word}", {"0": "zero", "word": "{x:>9}"}) == "zero and {x:>9}"
    assert render_prompt("{{literal}} {word}", {"word": "w"}) == "{literal} w"
