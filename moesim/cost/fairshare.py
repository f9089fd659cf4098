"""Max-min fair bandwidth sharing of flows over links (progressive filling).

Flows that share a link share its bandwidth; a flow's rate is limited by its most
contended link, and bandwidth a bottlenecked flow cannot use goes to the others. This is
the steady state of TCP-like and credit-based fabrics and the standard flow-level model of
network simulators.
"""

from __future__ import annotations

import numpy as np


def incidence(paths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The links the flows use and a dense (used links x flows) 0/1 matrix over them.

    Only links crossed by some flow get a row, so the matrix stays small even on a large
    topology: entry (i, f) is 1 when flow f crosses link ``links[i]``.
    """
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    flat = np.concatenate(paths) if paths else np.zeros(0, dtype=np.int64)
    links, rows = np.unique(flat, return_inverse=True)
    a = np.zeros((len(links), len(paths)), dtype=np.float64)
    a[rows, np.repeat(np.arange(len(paths)), lengths)] = 1.0
    return links, a


def max_min_rates(a: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of the flows (columns of ``a``) under the rows' ``capacity``.

    Flows that cross no link get an infinite rate (they are local copies).
    """
    n_flows = a.shape[1]
    rates = np.full(n_flows, np.inf)
    active = a.any(axis=0)
    remaining = capacity.astype(float).copy()
    while active.any():
        users = a @ active  # active flows per link
        used = users > 0
        share = np.full(len(remaining), np.inf)
        share[used] = np.maximum(remaining[used], 0.0) / users[used]
        level = share.min()
        bottleneck = used & (share <= level * (1 + 1e-12))
        # every active flow crossing a bottleneck link is frozen at this level
        frozen = active & (bottleneck @ a > 0)
        rates[frozen] = level
        remaining -= a @ np.where(frozen, level, 0.0)
        active &= ~frozen
    return rates
