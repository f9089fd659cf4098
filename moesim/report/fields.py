"""Reading and printing the figures of a run summary (shared by reports, sweeps, compare)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def scalars(
    summary: Mapping[str, Any], prefix: str = "", skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any]]:
    """Every non-list leaf of a nested summary as ``(dotted.key, value)``, in order;
    sections whose dotted key is in ``skip`` are left out."""
    for k, v in summary.items():
        key = f"{prefix}{k}"
        if key in skip:
            continue
        if isinstance(v, Mapping):
            yield from scalars(v, key + ".", skip)
        elif not isinstance(v, list):
            yield key, v


def metric(summary: Mapping[str, Any], path: str) -> float | None:
    """The number at dotted ``path`` in a run summary (None if absent or not a number)."""
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def number(v: Any) -> str:
    """A figure for a table: 4 significant digits, scientific outside [1e-3, 1e7)."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e7 else f"{v:.3e}"
