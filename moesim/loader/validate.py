"""Validation with located messages: pydantic errors and cross-field rules -> Issues.

Pydantic reports field paths; the position map from :mod:`moesim.loader.yamlpos` turns
them into file:line:col. Messages say what was expected and what was found, and unknown
keys get a "did you mean" hint from the fields allowed at that place.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from moesim.config.scenario import Scenario
from moesim.config.workload import AVAILABLE_WORKLOADS, PLANNED_WORKLOADS
from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader import limits, rules
from moesim.loader.yamlpos import Path, Positions


def validate(
    data: dict[str, Any], positions: Positions, file: str, enforce_limits: bool = True
) -> Scenario:
    """Build the frozen Scenario or raise ScenarioError listing every problem; the resource
    bounds of :mod:`moesim.loader.limits` are checked first unless ``enforce_limits`` is off."""
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        issues = [i for err in exc.errors() for i in _issues(err, data, positions, file)]
        raise ScenarioError(_dedupe(issues)) from None
    problems = limits.check(scenario) if enforce_limits else []
    if problems:
        raise ScenarioError(
            [Issue(_locate(_parse_path(p), positions, file), p, m) for p, m in problems]
        )
    problems = rules.check(scenario)
    if problems:
        raise ScenarioError(
            [Issue(_locate(_parse_path(p), positions, file), p, m) for p, m in problems]
        )
    return scenario


M = typing.TypeVar("M", bound=BaseModel)


def validate_as(model: type[M], data: dict[str, Any], positions: Positions, file: str) -> M:
    """Build any frozen config record (e.g. a sweep file) with the same located errors."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = [i for err in exc.errors() for i in _issues(err, data, positions, file, model)]
        raise ScenarioError(_dedupe(issues)) from None


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen: set[str] = set()
    out = []
    for i in issues:
        if str(i) not in seen:
            seen.add(str(i))
            out.append(i)
    return out


def _parse_path(text: str) -> Path:
    out: list[str | int] = []
    for part in text.replace("[", ".[").split("."):
        if not part:
            continue
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


def _locate(path: Path, positions: Positions, file: str) -> Location:
    """The location of the deepest prefix of ``path`` that the sources define."""
    for n in range(len(path), -1, -1):
        if path[:n] in positions:
            return positions[path[:n]]
    return Location(file)


def _data_path(loc: tuple[int | str, ...], data: Any) -> Path:
    """Drop pydantic's union-member tags from an error loc, keeping real data keys."""
    out: list[str | int] = []
    node = data
    tagged: set[int] = set()
    for part in loc:
        if (
            isinstance(node, dict)
            and isinstance(part, str)
            and node.get("kind") == part
            and id(node) not in tagged
        ):
            # a discriminated-union tag (checked first: a cluster of kind "nodes" also has
            # a field "nodes"); the same name once more is the field
            tagged.add(id(node))
            continue
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(part, str) and (part.startswith("function-") or "[" in part):
            continue
        else:
            out.append(part)
            node = None
    return tuple(out)


def _issues(
    err: Any,
    data: dict[str, Any],
    positions: Positions,
    file: str,
    root: type[BaseModel] = Scenario,
) -> list[Issue]:
    """One pydantic error as Issues; a model validator's ``field: message`` lines each
    become an issue at that field."""
    if err["type"] == "value_error":
        path = _data_path(tuple(err["loc"]), data)
        text = str((err.get("ctx") or {}).get("error", err["msg"]))
        out = []
        for line in text.splitlines() or [text]:
            field, sep, rest = line.partition(": ")
            here = path
            parts = field.split(".")
            if (
                sep
                and all(part.isidentifier() for part in parts)
                and isinstance(_value_at(data, path), dict)
            ):
                here, line = (*path, *parts), rest
            out.append(Issue(_locate(here, positions, file), dotted(here), line))
        return out
    return [_issue(err, data, positions, file, root)]


def _issue(
    err: Any,
    data: dict[str, Any],
    positions: Positions,
    file: str,
    root: type[BaseModel] = Scenario,
) -> Issue:
    path = _data_path(tuple(err["loc"]), data)
    where = _locate(path, positions, file)
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    msg: str
    if kind == "extra_forbidden":
        allowed = _fields_at(root, path[:-1], data)
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        if hint:
            msg = f"unknown key (did you mean {hint[0]!r}?)"
        else:
            msg = "unknown key" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        kind_at = positions.get((*path[:-1], "kind"))
        if kind_at is not None and kind_at.file.startswith("--set"):
            parent = dotted(path[:-1])
            msg += (
                f" ({parent}.kind was changed by --set, which keeps the other fields: "
                f"replace the whole mapping instead, e.g. --set '{parent}={{kind: ..., ...}}')"
            )
    elif kind == "missing":
        msg = "required field is missing"
    elif (
        kind == "union_tag_invalid"
        and path == ("workload",)
        and ctx.get("tag") in PLANNED_WORKLOADS
    ):
        msg = (
            f"kind {ctx['tag']!r} is not yet available in this version of moesim "
            f"(planned); available kinds: {', '.join(AVAILABLE_WORKLOADS)}"
        )
        path = ("workload", "kind")
        where = _locate(path, positions, file)
    elif kind == "union_tag_invalid":
        msg = f"kind must be one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}"
        path = (*path, "kind")
        where = _locate(path, positions, file)
    elif kind == "union_tag_not_found":
        msg = f"a 'kind' is required, one of {ctx.get('expected_tags')}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        bound = next(iter(ctx.values()))
        msg = f"must be {op} {bound}, got {value!r}"
    elif kind == "literal_error":
        msg = f"expected one of {ctx.get('expected')}, got {value!r}"
    else:
        expected = err["msg"][0].lower() + err["msg"][1:]
        msg = f"{expected}, got {_short(value)}"
    return Issue(where, dotted(path), msg)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_at(data: Any, path: Path) -> Any:
    node = data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _fields_at(model: type[BaseModel], path: Path, data: Any) -> list[str]:
    """The field names allowed in the mapping at ``path`` (empty if it cannot be told)."""
    ann: Any = model
    node = data
    for part in path:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
        ann = _step(ann, part, node)
        if ann is None:
            return []
    model_cls = _pick_model(ann, node)
    return list(model_cls.model_fields) if model_cls else []


def _step(ann: Any, part: str | int, node: Any) -> Any:
    model_cls = _pick_model(ann, None)
    if model_cls is not None and isinstance(part, str):
        field = model_cls.model_fields.get(part)
        return field.annotation if field else None
    args = typing.get_args(ann)
    if isinstance(part, int) and args:
        return args[0]
    return None


def _pick_model(ann: Any, node: Any) -> type[BaseModel] | None:
    """Resolve an annotation (Optional, Annotated, unions tagged by ``kind``) to a model."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _pick_model(typing.get_args(ann)[0], node)
    if origin in (typing.Union, types.UnionType):
        members = [m for m in (_pick_model(a, node) for a in typing.get_args(ann)) if m]
        if isinstance(node, dict) and "kind" in node:
            for m in members:
                kind_field = m.model_fields.get("kind")
                if kind_field and node["kind"] in typing.get_args(kind_field.annotation):
                    return m
        return members[0] if len(members) == 1 else None
    return None
