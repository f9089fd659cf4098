"""Turn scenario files into one plain mapping: includes, presets, and ``--set`` overrides.

Everything here works on plain data plus a position map; nothing is validated yet. The
order is fixed: included files first (in order), then the scenario itself, then command-line
overrides; presets are expanded last, so an override may change a single field of a preset.
The links and switches a cluster names are expanded into its ``links`` and ``switches``
tables the same way, so the resolved scenario holds every hardware figure a run uses.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path as FsPath
from typing import Any

from moesim.errors import Issue, Location, ScenarioError, dotted
from moesim.loader.files import MAX_YAML_BYTES, PathPolicy, read_input
from moesim.loader.merge import is_preset_path, merge
from moesim.loader.yamlpos import Positions, decode_text, is_valid_yaml, load_located, parse_value

_PARSED: dict[tuple[str, bytes], tuple[Any, Positions]] = {}
_PARSED_MAX = 16
"""Parses kept per process: a sweep or a capacity search loads the same base file for
every point (the bytes are read each time; only an identical file reuses a parse)."""


def _parsed(raw: bytes, file: str) -> tuple[Any, Positions]:
    """``load_located`` of a file's bytes, reusing the parse of the same bytes and name;
    callers get their own copy (resolution edits the data in place)."""
    key = (file, raw)
    hit = _PARSED.get(key)
    if hit is None:
        hit = load_located(decode_text(raw, file), file)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = hit
    return copy.deepcopy(hit[0]), dict(hit[1])


def read_mapping(
    path: str | FsPath,
    what: str = "a scenario",
    loc: Location | None = None,
    field_path: str = "",
) -> tuple[dict[str, Any], Positions]:
    """One YAML file that must hold a mapping, with positions (located errors). ``loc``:
    where the path was written (an include), for errors about the file itself; whether
    it may be read is the caller's check (:meth:`PathPolicy.problem`)."""
    file = str(path)
    raw = read_input(FsPath(path), MAX_YAML_BYTES, loc or Location(file), field_path)
    data, positions = _parsed(raw, file)
    if not isinstance(data, dict):
        raise ScenarioError([Issue(positions[()], "", f"{what} must be a YAML mapping")])
    return data, positions


def read_file(
    path: str | FsPath,
    stack: tuple[str, ...] = (),
    policy: PathPolicy | None = None,
    at: Location | None = None,
) -> tuple[dict[str, Any], Positions]:
    """Read a scenario file and the files it includes, merged, with positions. Includes
    are relative to the including file and must lie where ``policy`` allows (by default
    the folder of the top-level file)."""
    file = str(path)
    if policy is None:
        policy = PathPolicy.for_scenario(file)
    data, positions = read_mapping(path, loc=at, field_path="include" if at else "")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ScenarioError(
            [Issue(positions[("include",)], "include", "expected a file path or a list of them")]
        )
    merged: dict[str, Any] = {}
    merged_pos: Positions = {}
    here = os.path.realpath(file)
    for i, inc in enumerate(includes):
        target = FsPath(file).parent / inc
        loc = positions.get(("include", i), positions[("include",)])
        key = os.path.realpath(target)
        if key in stack or key == here:
            raise ScenarioError([Issue(loc, "include", f"include cycle through {inc}")])
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise ScenarioError(
                [Issue(loc, "include", f"includes nest more than {MAX_INCLUDE_DEPTH} files deep")]
            )
        why = policy.problem(target, from_set=False)
        if why:
            raise ScenarioError([Issue(loc, "include", why)])
        if not os.path.lexists(target):
            raise ScenarioError(
                [Issue(loc, "include", f"no such file: {inc!r} (looked for {str(target)!r})")]
            )
        sub, sub_pos = read_file(target, (*stack, here), policy, loc)
        merge(merged, merged_pos, sub, sub_pos, ())
    merge(merged, merged_pos, data, positions, ())
    return merged, merged_pos


MAX_INCLUDE_DEPTH = 16
"""Files an include chain may nest."""


def apply_overrides(
    data: dict[str, Any], positions: Positions, overrides: list[str] | tuple[str, ...]
) -> None:
    """Apply ``--set a.b.c=value`` overrides in place; values parse as YAML scalars."""
    issues: list[Issue] = []
    for text in overrides:
        loc = Location(f"--set {text}")
        if "=" not in text:
            issues.append(Issue(loc, "", "expected FIELD.PATH=VALUE"))
            continue
        key, _, raw = text.partition("=")
        parts: list[str | int] = [_part(p) for p in key.strip().split(".")]
        if not key.strip() or any(p == "" for p in parts):
            issues.append(Issue(loc, key, "expected a dotted field path such as model.top_k"))
            continue
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            here = tuple(parts[: depth + 1])
            child = node[part] if _has(node, part) else None
            if isinstance(child, str) and is_preset_path(here):
                child = {"preset": child}
            if child is None:
                child = {}
            if not isinstance(child, dict | list):
                issues.append(Issue(loc, dotted(here), f"is {child!r}, not a mapping"))
                break
            _put(node, part, child)
            node = child
        else:
            value = parse_value(raw)
            if raw.strip()[:1] in ("{", "[") and not is_valid_yaml(raw):
                issues.append(Issue(loc, key, "the value is not valid YAML (an unclosed { or [?)"))
                continue
            if not _put(node, parts[-1], value):
                size = len(node) if isinstance(node, list) else 0
                issues.append(
                    Issue(
                        loc, dotted(tuple(parts)), f"no such list index: the list has {size} items"
                    )
                )
                continue
            for p in [p for p in positions if p[: len(parts)] == tuple(parts)]:
                del positions[p]
            positions[tuple(parts)] = loc
            for depth in range(1, len(parts)):  # keys the --set created are located there
                positions.setdefault(tuple(parts[:depth]), loc)
    if issues:
        raise ScenarioError(issues)


def _part(text: str) -> str | int:
    """A list index (ASCII digits) or a key."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else text


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _put(node: Any, part: str | int, value: Any) -> bool:
    """Set ``node[part]``; False when ``node`` is a list that has no such index."""
    if isinstance(node, dict):
        node[part] = value
        return True
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        node[part] = value
        return True
    return False
