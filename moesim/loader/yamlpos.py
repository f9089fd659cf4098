"""Safe YAML loading that remembers where every key and value came from.

Only plain data is built (PyYAML's safe constructors): no object construction, no custom
tags. Alongside the data comes a map from field path to :class:`~moesim.errors.Location`,
so that validation errors can name the file, line and column of the offending field.

Every way YAML can fail ends in a located :class:`~moesim.errors.ScenarioError`: syntax,
characters YAML does not allow, scalars a constructor rejects (``!!int abc``, a 5,000-digit
integer, ``2001-02-30``), nesting deeper than :data:`MAX_DEPTH` (checked on the event
stream, before PyYAML's recursive composer runs), aliases that refer to themselves, and
aliases that expand to more than :data:`MAX_ALIAS_NODES` nodes (an "alias bomb": checked
on the node graph before the data and its positions are built).
"""

from __future__ import annotations

from typing import Any

import yaml

from moesim.errors import Issue, Location, ScenarioError, dotted

Path = tuple[str | int, ...]
_PLAIN_COLLECTIONS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
Positions = dict[Path, Location]

MAX_DEPTH = 64
"""Nesting levels of mappings and lists, counting those reached through aliases (the
deepest shipped file has 6)."""
MAX_ALIAS_NODES = 10_000
"""Nodes that aliases may add when expanded (each alias copies what its anchor holds)."""


def _loc(file: str, mark: Any) -> Location:
    if mark is None:
        return Location(file)
    return Location(file, mark.line + 1, mark.column + 1)


def _fail(file: str, mark: Any, message: str, path: Path = ()) -> ScenarioError:
    return ScenarioError([Issue(_loc(file, mark), dotted(path), message)])


def offset_location(text: str, offset: int, file: str) -> Location:
    """The line and column of character ``offset`` of ``text`` (1-based)."""
    before = text[:offset]
    line = before.count("\n") + 1
    return Location(file, line, offset - (before.rfind("\n") + 1) + 1)


def decode_text(raw: bytes, file: str) -> str:
    """UTF-8 text of a file's bytes; bytes that are not UTF-8 are a located error."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        head = raw[: exc.start]
        line = head.count(b"\n") + 1
        col = exc.start - (head.rfind(b"\n") + 1) + 1
        raise ScenarioError(
            [
                Issue(
                    Location(file, line, col),
                    "",
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8",
                )
            ]
        ) from None


def load_located(text: str, file: str, trusted: bool = False) -> tuple[Any, Positions]:
    """Parse YAML text into plain data plus the location of every path in it (an empty
    document is an empty mapping). ``trusted`` text (the shipped catalog) is parsed with
    libyaml where PyYAML has it (about 10x faster, same data and marks); user files always
    go through the pure-Python parser, whose every error this module locates."""
    data, positions = _load(text, file, _FAST_LOADER if trusted else yaml.SafeLoader)
    if data is _EMPTY:
        return {}, positions
    return data, positions


_EMPTY = object()
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(text: str, file: str, loader_cls: Any = yaml.SafeLoader) -> tuple[Any, Positions]:
    try:
        _check_nesting(text, file, loader_cls)
        loader = loader_cls(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return _EMPTY, {(): Location(file, 1, 1)}
            _check_graph(node, file)
            positions: Positions = {}
            issues: list[Issue] = []
            data = _build(loader, node, (), file, positions, issues)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "cannot be parsed"
        raise _fail(file, mark, f"invalid YAML: {what}") from None
    except yaml.reader.ReaderError as exc:
        where = offset_location(text, exc.position, file)
        msg = f"invalid YAML: character U+{exc.character:04X} is not allowed in YAML text"
        raise ScenarioError([Issue(where, "", msg)]) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error is one of the above
        raise ScenarioError(
            [Issue(Location(file), "", f"invalid YAML: {type(exc).__name__}")]
        ) from None
    except RecursionError:  # pragma: no cover - nesting and aliases are bounded above
        raise ScenarioError(
            [Issue(Location(file), "", "invalid YAML: nested too deeply")]
        ) from None
    if issues:
        raise ScenarioError(issues)
    return data, positions


def _check_nesting(text: str, file: str, loader_cls: Any = yaml.SafeLoader) -> None:
    """Nesting deeper than MAX_DEPTH is an error at the collection that goes too deep (on
    the event stream, which PyYAML builds without recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=loader_cls):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _fail(
                    file,
                    event.start_mark,
                    f"nested more than {MAX_DEPTH} levels deep (a limit of moesim's YAML "
                    "reader, which keeps deep nesting from exhausting the stack)",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_graph(root: yaml.Node, file: str) -> None:
    """Aliases that refer to an enclosing node (endless), that expand past MAX_DEPTH, or
    that add more than MAX_ALIAS_NODES nodes in all are located errors."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    added = [0]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    def size(node: yaml.Node, parent: yaml.Node | None, depth: int) -> int:
        key = id(node)
        if key in active:
            raise _fail(
                file,
                (parent or node).start_mark,
                "an alias here refers to a mapping or list that contains it (endless data)",
            )
        if key in sizes:  # a second use of an anchored node: an alias expands it
            added[0] += sizes[key]
            if added[0] > MAX_ALIAS_NODES:
                raise _fail(
                    file,
                    (parent or node).start_mark,
                    f"aliases expand to more than {MAX_ALIAS_NODES} nodes in all (a limit of "
                    "moesim's YAML reader: each alias copies its anchor's data)",
                )
            return sizes[key]
        if depth > MAX_DEPTH:
            raise _fail(
                file,
                node.start_mark,
                f"nested more than {MAX_DEPTH} levels deep once aliases are expanded",
            )
        active.add(key)
        total = 1 + sum(size(c, node, depth + 1) for c in children(node))
        active.discard(key)
        sizes[key] = total
        return total

    size(root, None, 0)


def _scalar(loader: yaml.SafeLoader, node: yaml.Node, file: str, path: Path) -> Any:
    """One scalar constructed by PyYAML's safe constructors; what they reject is located."""
    tag = str(node.tag).rsplit(":", 1)[-1]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise _fail(file, node.start_mark, f"invalid YAML: {exc.problem}", path) from None
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        why = "more digits than Python converts (4300)" if "digits" in str(exc) else ""
        what = {"timestamp": "date", "bool": "boolean"}.get(tag, tag)
        msg = f"invalid YAML: not a valid {what} (tag !!{tag})"
        raise _fail(file, node.start_mark, f"{msg}{': ' + why if why else ''}", path) from None


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
        raise _fail(
            file,
            node.start_mark,
            f"invalid YAML: unsupported tag {node.tag!r} (only plain YAML data)",
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail(file, key_node.start_mark, "a key must be a plain value", path)
            key = _scalar(loader, key_node, file, path)
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
    return _scalar(loader, node, file, path)


def parse_value(text: str, label: str = "--set") -> Any:
    """Parse one command-line value with the same rules (and bounds) as a YAML value; text
    that is not valid YAML stays a string."""
    if not text.strip():
        return ""
    try:
        data, _ = _load(text, label)
    except ScenarioError:
        return text
    return None if data is _EMPTY else data


def is_valid_yaml(text: str) -> bool:
    """Whether ``text`` parses as (bounded) YAML."""
    try:
        _load(text, "")
    except ScenarioError:
        return False
    return True
