"""Max-min fair bandwidth sharing of flows over links (progressive filling).

Flows that share a link share its bandwidth; a flow's rate is limited by its most
contended link, and bandwidth a bottlenecked flow cannot use goes to the others. This is
the steady state of TCP-like and credit-based fabrics and the standard flow-level model of
network simulators.

The (links x flows) incidence matrix is dense for small problems (fastest for a node's
handful of GPUs) and sparse for large ones (thousands of flows over a torus or a fabric).
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.sparse as sp

DENSE_LIMIT = 200_000
"""Largest links x flows product kept as a dense matrix."""

Incidence: TypeAlias = "np.ndarray | sp.csr_matrix"


def incidence(paths: list[np.ndarray]) -> tuple[np.ndarray, Incidence]:
    """The links the flows use and a (used links x flows) 0/1 matrix over them.

    Only links crossed by some flow get a row, so the matrix stays small even on a large
    topology: entry (i, f) is 1 when flow f crosses link ``links[i]``.
    """
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    flat = np.concatenate(paths) if paths else np.zeros(0, dtype=np.int64)
    links, rows = np.unique(flat, return_inverse=True)
    cols = np.repeat(np.arange(len(paths)), lengths)
    if len(links) * len(paths) <= DENSE_LIMIT:
        a = np.zeros((len(links), len(paths)), dtype=np.float64)
        a[rows, cols] = 1.0
        return links, a
    data = np.ones(len(rows))
    return links, sp.csr_matrix((data, (rows, cols)), shape=(len(links), len(paths)))


def max_min_rates(a: Incidence, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of the flows (columns of ``a``) under the rows' ``capacity``.

    Flows that cross no link get an infinite rate (they are local copies).
    """
    coo = sp.coo_matrix(a)
    return max_min_rates_coo(coo.row, coo.col, a.shape[1], capacity)


def max_min_rates_coo(
    rows: np.ndarray, cols: np.ndarray, n_flows: int, capacity: np.ndarray
) -> np.ndarray:
    """Max-min fair rates with the incidence given as (link, flow) index pairs.

    Each round of progressive filling finds the most contended links, freezes the flows
    crossing them at their fair share, and removes that bandwidth; every step is a
    ``bincount`` over the pairs, so a round costs O(pairs).
    """
    n_links = len(capacity)
    rates = np.full(n_flows, np.inf)
    active = np.zeros(n_flows, dtype=bool)
    active[cols] = True
    remaining = capacity.astype(float).copy()
    while active.any():
        users = np.bincount(rows, weights=active[cols], minlength=n_links)
        used = users > 0
        share = np.full(n_links, np.inf)
        share[used] = np.maximum(remaining[used], 0.0) / users[used]
        level = share.min()
        bottleneck = used & (share <= level * (1 + 1e-12))
        frozen = np.zeros(n_flows, dtype=bool)
        frozen[cols[bottleneck[rows] & active[cols]]] = True
        rates[frozen] = level
        remaining -= np.bincount(
            rows, weights=np.where(frozen, level, 0.0)[cols], minlength=n_links
        )
        active &= ~frozen
    return rates
