"""Safe YAML loading that remembers where every key and value came from.

Only plain data is built (PyYAML's safe constructors): no object construction, no custom
tags. Alongside the data comes a map from field path to :class:`~moesim.errors.Location`,
so that validation errors can name the file, line and column of the offending field.
"""

from __future__ import annotations

from typing import Any

import yaml

from moesim.errors import Issue, Location, ScenarioError, dotted

Path = tuple[str | int, ...]
_PLAIN_COLLECTIONS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
Positions = dict[Path, Location]


def _loc(file: str, mark: yaml.Mark | None) -> Location:
    if mark is None:
        return Location(file)
    return Location(file, mark.line + 1, mark.column + 1)


def load_located(text: str, file: str) -> tuple[Any, Positions]:
    """Parse YAML text into plain data plus the location of every path in it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {(): Location(file, 1, 1)}
        positions: Positions = {}
        issues: list[Issue] = []
        data = _build(loader, node, (), file, positions, issues)
    except yaml.MarkedYAMLError as exc:
        where = _loc(file, exc.problem_mark)
        raise ScenarioError([Issue(where, "", f"invalid YAML: {exc.problem}")]) from None
    finally:
        loader.dispose()
    if issues:
        raise ScenarioError(issues)
    return data, positions


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: Path,
    file: str,
    positions: Positions,
    issues: list[Issue],
) -> Any:
    positions[path] = _loc(file, node.start_mark)
    if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_COLLECTIONS:
        raise yaml.constructor.ConstructorError(
            None, None, f"unsupported tag {node.tag!r} (only plain YAML data)", node.start_mark
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            child = (*path, key)
            if key in out:
                issues.append(
                    Issue(_loc(file, key_node.start_mark), dotted(child), "duplicate key")
                )
                continue
            out[key] = _build(loader, value_node, child, file, positions, issues)
            # point at the key, not the value, so "unknown key" errors land on it
            positions[child] = _loc(file, key_node.start_mark)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(loader, item, (*path, i), file, positions, issues)
            for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def parse_value(text: str) -> Any:
    """Parse one command-line value with the same rules as a YAML value."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
