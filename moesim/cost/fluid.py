"""Finish times of a batch of flows that start together, from per-link loads (no events).

The analytic counterpart of the flow-by-flow max-min simulation
(:mod:`moesim.engine.network`), for exchanges too large to simulate flow by flow (an
expert-parallel all-to-all of 64 ranks per group on hundreds of chips is tens of thousands
of concurrent flows). Every link is a work-conserving fluid server shared fairly by the
flows crossing it:

- a flow of ``b`` bytes on link ``e`` is done with that link once the link has carried, of
  every flow ``g`` of the batch crossing it, ``min(b_g, b)`` bytes (processor sharing:
  smaller flows leave first, then the rest share the freed bandwidth), after whatever the
  link still had to carry from earlier batches (its backlog, served first);
- the flow is delivered when its most loaded link is done with it, plus the route's
  latency.

Exact for flows sharing a single link (an all-to-all over one link takes total bytes /
bandwidth + latency) and for flows whose routes' busiest links are not coupled through
other bottlenecks. What it leaves out: a link whose flows are held back by a bottleneck
elsewhere is assumed to keep transmitting at full rate, so with multi-hop routes the
times are slightly optimistic where bottlenecks chain; and a later batch does not slow an
earlier one on links they share (the earlier one is served first). ``tests/test_fluid.py``
bounds the difference against the exact simulation on cases where both run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchTimes:
    """Per-flow finish times of one batch and the links' new drain times."""

    done_s: np.ndarray
    """When each flow's last byte has left its busiest link (absolute, latency excluded)."""
    link_free_s: np.ndarray
    """When each link will have carried everything assigned to it so far."""


def batch_finish_s(
    now_s: float,
    flow: np.ndarray,
    edge: np.ndarray,
    nbytes: np.ndarray,
    capacity_bytes_per_s: np.ndarray,
    link_free_s: np.ndarray,
    inplace: bool = False,
) -> BatchTimes:
    """Finish times of flows ``nbytes`` (one per flow) starting at ``now_s``.

    ``(flow, edge)`` are the incidence pairs of the flows' routes; ``link_free_s`` is when
    each link drains the bytes of earlier batches (a backlog served before this batch).
    Flows crossing no link finish at ``now_s``. With ``inplace``, ``link_free_s`` itself is
    updated and returned (the caller's own array) instead of a copy.
    """
    n_flows = len(nbytes)
    done = np.full(n_flows, now_s, dtype=float)
    free = link_free_s if inplace else link_free_s.copy()
    if len(flow) == 0:
        return BatchTimes(done, free)
    size = nbytes[flow]
    # pairs grouped by link, smallest flow first within a link
    order = np.lexsort((size, edge))
    e, b = edge[order], size[order]
    first_of_link = np.empty(len(e), dtype=bool)
    first_of_link[0] = True
    np.not_equal(e[1:], e[:-1], out=first_of_link[1:])
    starts = np.flatnonzero(first_of_link)
    ends = np.append(starts[1:], len(e))
    group = np.cumsum(first_of_link) - 1  # each pair's link group
    cum = np.cumsum(b)
    cum_before_link = np.concatenate([[0.0], cum[starts[1:] - 1]])
    before = cum - b - cum_before_link[group]  # smaller ones
    later = ends[group] - np.arange(len(e)) - 1  # same size or larger
    shared = before + b + b * later  # sum over the link's flows of min(b_g, b)
    links = e[starts]
    backlog = np.maximum(free[links] - now_s, 0.0)
    t = now_s + backlog[group] + shared / capacity_bytes_per_s[e]
    per_pair = np.empty(len(t))
    per_pair[order] = t
    if len(flow) > 1 and bool((flow[1:] < flow[:-1]).any()):
        by_flow = np.argsort(flow, kind="stable")
        f, per_pair = flow[by_flow], per_pair[by_flow]
    else:  # already grouped by flow, in order (routes as edge_pairs gives them)
        f = flow
    first = np.flatnonzero(np.concatenate([[True], f[1:] != f[:-1]]))
    done[f[first]] = np.maximum(now_s, np.maximum.reduceat(per_pair, first))
    load = cum[ends - 1] - cum_before_link
    free[links] = now_s + backlog + load / capacity_bytes_per_s[links]
    return BatchTimes(done, free)
