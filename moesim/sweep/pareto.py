"""Metrics from summaries, feasibility against bounds, and the Pareto front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moesim.config.sweep import Bound
from moesim.report.fields import metric

__all__ = ["feasible", "front", "metric", "pareto_mask"]


def feasible(values: Mapping[str, float | None], bounds: Mapping[str, Bound]) -> bool:
    """Whether every bounded metric is present and within its bounds."""
    for name, b in bounds.items():
        v = values.get(name)
        if v is None or (b.max is not None and v > b.max) or (b.min is not None and v < b.min):
            return False
    return True


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """Rows of ``costs`` (points x objectives, all to be minimized) that no other row
    dominates (no worse in every objective and better in one). Ties are all kept."""
    n = len(costs)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        no_worse = np.all(costs <= costs[i], axis=1)
        better = np.any(costs < costs[i], axis=1)
        if np.any(no_worse & better):
            keep[i] = False
    return keep


def front(
    rows: Sequence[Mapping[str, float | None]],
    minimize: Sequence[str],
    maximize: Sequence[str],
    candidates: Sequence[int],
) -> list[int]:
    """Indices (into ``rows``) of the Pareto-optimal ``candidates`` that have every objective."""
    names = [*minimize, *maximize]
    if not names:
        return []
    usable = [i for i in candidates if all(rows[i].get(m) is not None for m in names)]
    if not usable:
        return []
    sign = np.array([1.0] * len(minimize) + [-1.0] * len(maximize))
    costs = np.array([[rows[i][m] for m in names] for i in usable], dtype=float) * sign
    return [i for i, k in zip(usable, pareto_mask(costs)) if k]
