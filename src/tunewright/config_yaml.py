"""Reading a YAML config file: safe types only, no duplicated keys, errors with line and column.

The file is composed into a node tree first, so a duplicated key can be reported with both of
its lines (PyYAML keeps the last value silently), and a bad value can be quoted as it was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# PyYAML's safe loader: plain data only; any tag naming a Python object is refused.
ConfigLoader = yaml.SafeLoader


@dataclass
class YamlDocument:
    """A parsed config file: the data, its node tree, and the problems found before validation."""

    data: Any
    root: yaml.Node | None
    problems: list[str] = field(default_factory=list)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _syntax_message(error: yaml.YAMLError) -> str:
    """`line L, column C: problem (context)` from a PyYAML error, on one line."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        message = f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {_one_line(error.problem or '')}"
        if error.context and error.context_mark is not None:
            start = error.context_mark
            message += f" ({_one_line(error.context)} at line {start.line + 1}, column {start.column + 1})"
        if "'\\t'" in (error.problem or ""):
            message += "; indent with spaces, not tabs"
        if isinstance(error, yaml.constructor.ConstructorError) and "tag" in (error.problem or ""):
            message += "; YAML tags are not allowed in a config"
        return message
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character if isinstance(error.character, str) else chr(error.character)
        return (f"character {error.position + 1}: not valid YAML: {error.reason} "
                f"(#x{ord(character):04x}); remove it or save the file as UTF-8 text")
    lines = str(error).splitlines()
    return f"not valid YAML: {_one_line(' '.join(lines[:2])) if lines else type(error).__name__}"


def _scalar_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else f"a {node.id}"


def duplicate_keys(root: yaml.Node) -> list[str]:
    """`trainer.epochs: key appears twice (lines 4 and 9)` for every mapping that repeats a key.

    Walks the node tree iteratively and visits each node once, so anchors and aliases
    (which share nodes) cannot make it exponential.
    """
    problems: list[str] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = _scalar_text(key_node)
                key_path = f"{path}.{key}" if path else key
                line = key_node.start_mark.line + 1
                if key == "<<" and key_node.tag == "tag:yaml.org,2002:merge":
                    pass  # merge keys (`<<: *defaults`) may be overridden on purpose
                elif key in first_line:
                    problems.append(
                        f"{key_path}: key appears twice (lines {first_line[key]} and {line}); keep one"
                    )
                else:
                    first_line[key] = line
                stack.append((value_node, key_path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(node.value))
    return sorted(problems)


def parse_yaml(text: str) -> YamlDocument:
    """Compose, check and construct one YAML document.

    Raises:
        ValueError: a one-line message (syntax error with its line and column, empty document).
    """
    try:
        loader = ConfigLoader(text)
    except yaml.reader.ReaderError as error:  # raised on the first bytes, before a loader exists
        raise ValueError(_syntax_message(error)) from None
    try:
        root = loader.get_single_node()
        problems = duplicate_keys(root) if root is not None else []
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as error:
        raise ValueError(_syntax_message(error)) from None
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:  # no document, only comments, or a lone `---`
        raise ValueError("the file is empty; a config needs at least input_features and output_features")
    return YamlDocument(data=data, root=root, problems=problems)


def read_yaml(path: Path) -> YamlDocument:
    """Read a config file as UTF-8 and parse it.

    Raises:
        ValueError: one line saying what is wrong and where.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    return parse_yaml(text)


def node_at(root: yaml.Node | None, location: tuple[int | str, ...]) -> yaml.Node | None:
    """The node a validation error's location points at, if the tree has it."""
    node = root
    for item in location:
        if isinstance(node, yaml.MappingNode):
            matches = [value for key, value in node.value if _scalar_text(key) == str(item)]
            node = matches[-1] if matches else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and 0 <= item < len(node.value):
            node = node.value[item]
        else:
            return None
    return node


def written_as(root: yaml.Node | None, location: tuple[int | str, ...], value: Any) -> str:
    """A scalar as the user wrote it (`yes` stays `yes`, not `True`); a Python spelling without a file."""
    node = node_at(root, location)
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
