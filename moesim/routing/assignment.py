"""The assignment rule: token choices + capacity + overflow policy -> which expert runs what.

This is the one implementation of capacity semantics in moesim; the simulator and the
numpy reference both call it, so they agree exactly on per-expert counts and drops.

Semantics:
- capacity per expert = ceil(capacity_factor x tokens x top_k / experts) for the tokens of
  one routing group (None = unlimited);
- slots (token t, choice j < k) fill experts in priority order: ``token_order`` takes all
  first choices in token order, then all second choices, ... (GShard); ``probability``
  takes the highest router probability first (batch-prioritized routing);
- ``drop``: a slot over capacity falls to the residual (its contribution is zero);
- ``reroute``: rejected slots try, round after round, the token's next choices in ranking
  order (never an expert the token already holds), in priority order against the
  capacity left, until placed or the ranking is exhausted;
- ``dropless``: no capacity; every slot runs on its chosen expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

Overflow = Literal["drop", "reroute", "dropless"]
Priority = Literal["token_order", "probability"]


@dataclass(frozen=True)
class Assignment:
    """Where every routing slot of a group of tokens ends up."""

    expert: np.ndarray
    """int32 (tokens x top_k): the expert processing slot (t, j), or -1 if dropped."""
    counts: np.ndarray
    """int64 (experts,): slots processed by each expert."""
    capacity: int | None
    """Per-expert capacity applied (None = unlimited)."""

    @property
    def dropped(self) -> int:
        return int((self.expert < 0).sum())

    def rerouted(self, ranking: np.ndarray) -> int:
        """Slots processed by an expert other than their original choice."""
        k = self.expert.shape[1]
        kept = self.expert >= 0
        return int((kept & (self.expert != ranking[:, :k])).sum())


def capacity_for(
    tokens: int, top_k: int, experts: int, capacity_factor: float | None
) -> int | None:
    """Per-expert capacity of a routing group of ``tokens`` tokens."""
    if capacity_factor is None:
        return None
    # exact arithmetic on the decimal as written: in floats, 1.1 x 100 x 4 / 8 is
    # 55.00000000000001 and would round up to 56
    cf = Fraction(str(float(capacity_factor)))
    return math.ceil(cf * tokens * top_k / experts)


def rank_within(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """For items listed in priority order, each item's position among items of its group."""
    idx = np.argsort(groups, kind="stable")
    sorted_groups = groups[idx]
    starts = np.searchsorted(sorted_groups, np.arange(n_groups))
    rank = np.empty(len(groups), dtype=np.int64)
    rank[idx] = np.arange(len(groups)) - starts[sorted_groups]
    return rank


def assign(
    ranking: np.ndarray,
    top_k: int,
    experts: int,
    capacity: int | None,
    overflow: Overflow = "drop",
    priority: Priority = "token_order",
    scores: np.ndarray | None = None,
) -> Assignment:
    """Apply capacity and the overflow policy to ranked token choices.

    ``ranking`` is (tokens x depth) with depth >= top_k: each token's experts in preference
    order (depth = experts is needed for a full reroute). ``scores`` (same shape) are router
    probabilities, used by ``priority="probability"``.
    """
    tokens = ranking.shape[0]
    expert = ranking[:, :top_k].astype(np.int32).copy()
    if overflow == "dropless" or capacity is None or tokens == 0:
        return Assignment(expert, np.bincount(expert.ravel(), minlength=experts), None)
    # an expert takes at most every slot: a larger capacity never binds (nor overflows int64)
    left = np.full(experts, min(capacity, tokens * top_k), dtype=np.int64)
    t, j = np.divmod(np.arange(tokens * top_k), top_k)
    pos = j.copy()  # ranking position of each pending slot's candidate expert
    pointer = np.full(tokens, top_k, dtype=np.int64)  # next unused ranking position per token
    expert[:] = -1
    depth = ranking.shape[1]
    while t.size:
        e = ranking[t, pos].astype(np.int64)
        if priority == "probability" and scores is not None:
            prio = np.lexsort((t, j, -scores[t, pos]))
        else:
            prio = np.lexsort((t, j))
        t, j, pos, e = t[prio], j[prio], pos[prio], e[prio]
        ok = rank_within(e, experts) < left[e]
        expert[t[ok], j[ok]] = e[ok]
        left -= np.bincount(e[ok], minlength=experts)
        if overflow != "reroute":
            break
        t, j = t[~ok], j[~ok]
        # each rejected slot takes the next unused entry of its token's ranking
        order = np.lexsort((j, t))
        t, j = t[order], j[order]
        pos = pointer[t] + rank_within(t, tokens)
        np.add.at(pointer, t, 1)
        live = pos < depth
        t, j, pos = t[live], j[live], pos[live]
    counts = np.bincount(expert[expert >= 0], minlength=experts)
    return Assignment(expert, counts, capacity)
