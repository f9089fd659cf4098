"""Costs of collectives (all-reduce, all-gather, reduce-scatter) over the cluster topology.

Algorithms and their alpha-beta costs follow Thakur, Rabenseifner and Gropp, "Optimization
of Collective Communication Operations in MPICH" (IJHPCA 2005), for p ranks and n bytes:

- ring all-gather / reduce-scatter: (p-1) steps of n/p bytes;
- ring all-reduce: reduce-scatter then all-gather, 2(p-1) steps of n/p bytes;
- recursive halving/doubling all-reduce (Rabenseifner): 2 log2(p) steps moving
  2 (p-1)/p n bytes in all;
- binomial tree all-reduce (reduce then broadcast): 2 log2(p) steps of n bytes.

The per-step bandwidth is topology-aware: all ranks of a step send at once, so the step's
flows are rated together by max-min fair sharing over the graph
(:func:`moesim.cost.fairshare.max_min_rates`), and the slowest flow paces the step; the
per-step latency is the slowest flow's path latency plus ``alpha_s`` (a software cost per
step, e.g. a measured collective's alpha divided by its step count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from moesim.cost.fairshare import max_min_rates_coo
from moesim.topology.paths import PathTable
from moesim.units import GB

Algorithm = Literal["ring", "halving_doubling", "tree"]


def _step_s(
    paths: PathTable, pairs: Sequence[tuple[int, int]], nbytes: float, alpha_s: float
) -> float:
    """One step: every (src, dst) pair sends ``nbytes`` at the same time."""
    flows = np.array([(s, d) for s, d in pairs if s != d], dtype=np.int64).reshape(-1, 2)
    if not len(flows) or nbytes <= 0:
        return 0.0
    flow, edge, latency_s = paths.edge_pairs(flows[:, 0], flows[:, 1])
    links, rows = np.unique(edge, return_inverse=True)
    rates = max_min_rates_coo(rows, flow, len(flows), paths.bandwidth_gbps[links] * GB)
    slowest = float(np.max(nbytes / rates))
    return slowest + float(latency_s.max()) + alpha_s


def ring_pairs(group: Sequence[int]) -> list[tuple[int, int]]:
    """Each rank sends to the next rank of the ring (the group's order)."""
    return [(group[i], group[(i + 1) % len(group)]) for i in range(len(group))]


def all_gather_s(
    paths: PathTable, group: Sequence[int], nbytes: float, alpha_s: float = 0.0
) -> float:
    """Ring all-gather of an ``nbytes`` result (each rank contributes nbytes / p)."""
    p = len(group)
    if p < 2:
        return 0.0
    return (p - 1) * _step_s(paths, ring_pairs(group), nbytes / p, alpha_s)


def reduce_scatter_s(
    paths: PathTable, group: Sequence[int], nbytes: float, alpha_s: float = 0.0
) -> float:
    """Ring reduce-scatter of an ``nbytes`` buffer (each rank ends with nbytes / p)."""
    return all_gather_s(paths, group, nbytes, alpha_s)


def all_reduce_s(
    paths: PathTable,
    group: Sequence[int],
    nbytes: float,
    algorithm: Algorithm = "ring",
    alpha_s: float = 0.0,
) -> float:
    """All-reduce of an ``nbytes`` buffer over the devices of ``group``."""
    p = len(group)
    if p < 2 or nbytes <= 0:
        return 0.0
    if algorithm == "ring":
        return 2 * (p - 1) * _step_s(paths, ring_pairs(group), nbytes / p, alpha_s)
    if algorithm not in ("halving_doubling", "tree"):
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")
    if p & (p - 1):
        raise ValueError(f"{algorithm} all-reduce needs a power-of-two group, got {p}")
    total = 0.0
    rounds = int(math.log2(p))
    for r in range(rounds):
        distance = 1 << r
        pairs = [(group[i], group[i ^ distance]) for i in range(p)]
        if algorithm == "halving_doubling":
            # reduce-scatter by recursive halving, then all-gather by recursive doubling
            size = nbytes / (2 << r)
            total += 2 * _step_s(paths, pairs, size, alpha_s)
        else:
            # binomial tree: reduce to rank 0 then broadcast, whole buffer each step
            senders = [
                (group[i], group[i ^ distance]) for i in range(p) if i % (2 * distance) == distance
            ]
            total += 2 * _step_s(paths, senders, nbytes, alpha_s)
    return total
