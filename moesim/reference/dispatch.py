"""Dispatch and combine as explicit gather / scatter over an expert-sorted token buffer.

A routing decision is a (T x w) table ``expert`` (the expert processing slot (t, j), or -1)
with a weight per slot. ``build_plan`` flattens the kept slots and sorts them by expert
(stably, so within an expert slots stay in token order), giving index arrays:
``token_index[s]`` (the source token of buffer row s), ``weight[s]`` and ``offsets`` (expert
e owns rows ``offsets[e]:offsets[e+1]``). ``gather`` copies ``x[token_index]`` into the
buffer, ``run_experts`` applies each expert to its contiguous rows (one GEMM chain per
expert, as a grouped GEMM would), and ``scatter_combine`` adds ``weight[s] * out[s]`` back
into row ``token_index[s]`` of the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.reference.experts import ExpertWeights, ffn


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Index arrays of one dispatch: buffer row -> source token, weight, expert ranges."""

    token_index: np.ndarray
    """int64 (S,): source token of each buffer row, rows sorted by expert."""
    slot_index: np.ndarray
    """int64 (S,): choice column j of each buffer row in the routing table."""
    weight: np.ndarray
    """(S,): combine weight of each buffer row."""
    offsets: np.ndarray
    """int64 (E + 1,): expert e owns buffer rows offsets[e]:offsets[e+1]."""

    @property
    def counts(self) -> np.ndarray:
        """int64 (E,): buffer rows (processed slots) of each expert."""
        return np.diff(self.offsets)

    @property
    def rows(self) -> int:
        return int(self.token_index.shape[0])


def build_plan(expert: np.ndarray, weight: np.ndarray, experts: int) -> DispatchPlan:
    """The plan of a routing table ``expert`` (T x w, -1 = dropped) with slot weights (T x w)."""
    width = expert.shape[1]
    flat = expert.ravel().astype(np.int64)
    keep = np.flatnonzero(flat >= 0)
    order = keep[np.argsort(flat[keep], kind="stable")]
    t, j = np.divmod(order, width)
    sorted_experts = flat[order]
    offsets = np.searchsorted(sorted_experts, np.arange(experts + 1), side="left")
    return DispatchPlan(
        token_index=t.astype(np.int64),
        slot_index=j.astype(np.int64),
        weight=weight.ravel()[order],
        offsets=offsets.astype(np.int64),
    )


def gather(x: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    """The expert-sorted buffer (S x d_model): row s is ``x[token_index[s]]``."""
    out: np.ndarray = x[plan.token_index]
    return out


def run_experts(weights: ExpertWeights, buffer: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    """Each expert applied to its own contiguous rows of the buffer (S x d_model)."""
    out = np.zeros_like(buffer)
    for e in range(weights.n):
        lo, hi = int(plan.offsets[e]), int(plan.offsets[e + 1])
        if hi > lo:
            out[lo:hi] = ffn(weights, e, buffer[lo:hi])
    return out


def scatter_combine(out: np.ndarray, plan: DispatchPlan, tokens: int) -> np.ndarray:
    """Sum of weighted expert outputs per token (T x d_model); unrouted tokens get zeros."""
    y = np.zeros((tokens, out.shape[1]), dtype=out.dtype)
    np.add.at(y, plan.token_index, out * plan.weight[:, None].astype(out.dtype))
    return y
