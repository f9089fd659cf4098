"""The points of a sweep: grid combinations crossed with zipped lists, as ``--set`` texts."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from moesim.config.sweep import SweepConfig


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    index: int
    values: dict[str, Any]
    """The varied fields of this point (dotted path -> value)."""
    overrides: tuple[str, ...]
    """``set`` then the varied fields, as ``--set`` texts (values in JSON, which is YAML)."""


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def plain(value: Any) -> Any:
    """``value`` as JSON data: a YAML date becomes its text (a field expecting a number
    then says so), so point files and ``--set`` texts can always be written."""
    return json.loads(json.dumps(value, default=str))


def expand(cfg: SweepConfig) -> list[Point]:
    """Every point, grid-major in the file's key order, zipped lists fastest."""
    fixed = tuple(_override(k, plain(v)) for k, v in cfg.set.items())
    grid_keys = list(cfg.grid)
    combos = list(itertools.product(*(cfg.grid[k] for k in grid_keys))) if grid_keys else [()]
    n_zip = len(next(iter(cfg.zip.values()))) if cfg.zip else 1
    points: list[Point] = []
    for combo in combos:
        for j in range(n_zip):
            values = {k: plain(v) for k, v in zip(grid_keys, combo)}
            values.update({k: plain(v[j]) for k, v in cfg.zip.items()})
            overrides = fixed + tuple(_override(k, v) for k, v in values.items())
            points.append(Point(len(points), values, overrides))
    return points
