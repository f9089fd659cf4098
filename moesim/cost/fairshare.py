"""Max-min fair bandwidth sharing of flows over links (progressive filling).

Flows that share a link share its bandwidth; a flow's rate is limited by its most
contended link, and bandwidth a bottlenecked flow cannot use goes to the others. This is
the steady state of TCP-like and credit-based fabrics and the standard flow-level model of
network simulators.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def incidence(paths: list[np.ndarray], n_links: int) -> sp.csr_matrix:
    """A (links x flows) 0/1 matrix: entry (l, f) is 1 when flow f crosses link l."""
    cols = np.repeat(np.arange(len(paths)), [len(p) for p in paths])
    rows = np.concatenate(paths) if paths else np.zeros(0, dtype=np.int64)
    data = np.ones(len(rows))
    return sp.csr_matrix((data, (rows, cols)), shape=(n_links, len(paths)))


def max_min_rates(a: sp.csr_matrix, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of the flows (columns of ``a``) under link ``capacity``.

    Flows that cross no link get an infinite rate (they are local copies).
    """
    n_flows = a.shape[1]
    rates = np.full(n_flows, np.inf)
    if n_flows == 0:
        return rates
    a = a.tocsc()
    crosses = np.diff(a.indptr) > 0
    active = crosses.copy()
    remaining = capacity.astype(float).copy()
    at = a.T.tocsr()  # flows x links
    while active.any():
        users = a @ active.astype(float)  # active flows per link
        used = users > 0
        share = np.full_like(remaining, np.inf)
        share[used] = np.maximum(remaining[used], 0.0) / users[used]
        level = share.min()
        bottleneck = used & (share <= level * (1 + 1e-12))
        # every active flow crossing a bottleneck link is frozen at this level
        frozen = active & ((at @ bottleneck.astype(float)) > 0)
        rates[frozen] = level
        remaining -= a @ np.where(frozen, level, 0.0)
        active &= ~frozen
    return rates
