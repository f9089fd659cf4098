"""Routing one layer's tokens: sample every token's choices from the popularity, then apply
capacity and overflow per rank (each rank is a routing group), exactly as the reference does
(:func:`moesim.routing.assignment.assign`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.model import ModelConfig
from moesim.config.policies import PoliciesConfig
from moesim.layout import Layout
from moesim.routing.assignment import assign, capacity_for
from moesim.routing.distributions import sample_choices


@dataclass(frozen=True)
class LayerRouting:
    """The outcome of routing one layer's tokens, per source rank."""

    tokens_per_rank: np.ndarray
    """Tokens held by each stage-local rank."""
    counts: np.ndarray
    """Slots kept per (source rank, expert), int64 (ranks x experts)."""
    dropped: int
    """Slots (token, choice) dropped to the residual by capacity."""
    rerouted: int
    """Slots processed by an expert other than their original choice."""
    fully_dropped: int
    """Tokens that lost every one of their top_k slots (pass through on the residual only)."""
    capacity: int | None
    """Per-expert capacity of the largest routing group (None = unlimited)."""
    node_tokens: np.ndarray | None = None
    """Distinct tokens of each rank with at least one kept slot on each node (ranks x
    nodes), for all-to-alls that send a token once per node; None when not computed."""
    rank_tokens: np.ndarray | None = None
    """Distinct tokens of each rank with at least one kept slot on each EP rank (ranks x
    ep), for all-to-alls that send a token once per device (DeepEP's normal kernels);
    computed with ``node_tokens``."""


def node_token_counts(expert: np.ndarray, expert_node: np.ndarray, nodes: int) -> np.ndarray:
    """For a group's (tokens x top_k) kept experts (-1 dropped), the distinct tokens per node."""
    return distinct_counts(expert, expert_node, nodes)


def distinct_counts(expert: np.ndarray, group_of: np.ndarray, groups: int) -> np.ndarray:
    """For (tokens x top_k) kept experts (-1 dropped), the distinct tokens per group
    (``group_of[expert]``): per row, the groups sorted and counted once each."""
    if expert.size == 0:
        return np.zeros(groups, dtype=np.int64)
    where = np.where(expert >= 0, group_of[np.maximum(expert, 0)], -1).reshape(len(expert), -1)
    w = np.sort(where, axis=1)
    new = np.ones(w.shape, dtype=bool)
    np.not_equal(w[:, 1:], w[:, :-1], out=new[:, 1:])
    return np.bincount(w[new & (w >= 0)], minlength=groups).astype(np.int64)


def model_groups(model: ModelConfig) -> tuple[int, int] | None:
    """(expert groups, groups per token) of a group-limited model, else None."""
    if model.expert_groups is None or model.topk_groups is None:
        return None
    return model.expert_groups, model.topk_groups


def route_layer(
    rng: np.random.Generator,
    popularity: np.ndarray,
    layout: Layout,
    tokens: int,
    model: ModelConfig,
    policies: PoliciesConfig,
    expert_node: np.ndarray | None = None,
    choices: tuple[np.ndarray, np.ndarray] | None = None,
) -> LayerRouting:
    """Sample every token's choices and apply capacity per rank (each rank is a group).

    With ``expert_node`` (the node of each expert, per expert-data-parallel group), also
    count each rank's distinct tokens per node (see ``LayerRouting.node_tokens``).
    ``choices`` (ranking, scores) replaces the sampling (a replayed trace, a logits model:
    :func:`moesim.routing.replay.window_choices`). Group-limited models (``expert_groups``,
    ``topk_groups``) sample group-limited choices.
    """
    per_rank = layout.tokens_per_rank(tokens)
    experts, k = model.experts, model.top_k
    depth = experts if policies.overflow == "reroute" else k
    if choices is None:
        ranking, scores = sample_choices(rng, popularity, tokens, depth, model_groups(model))
    else:
        ranking, scores = choices
    counts = np.zeros((len(per_rank), experts), dtype=np.int64)
    dropped = rerouted = fully = 0
    cap_max: int | None = None
    nodes = int(expert_node.max()) + 1 if expert_node is not None else 0
    node_tokens = np.zeros((len(per_rank), nodes), dtype=np.int64)
    rank_tokens = np.zeros((len(per_rank), layout.ep), dtype=np.int64)
    start = 0
    for r, n in enumerate(per_rank):
        rk, sc = ranking[start : start + n], scores[start : start + n]
        start += n
        cap = capacity_for(int(n), k, experts, policies.capacity_factor)
        if policies.overflow == "dropless":
            cap = None
        a = assign(rk, k, experts, cap, policies.overflow, policies.priority, sc)
        counts[r] = a.counts
        dropped += a.dropped
        rerouted += a.rerouted(rk)
        fully += int((a.expert < 0).all(axis=1).sum())
        if expert_node is not None:
            node_tokens[r] = node_token_counts(a.expert, expert_node[layout.edp_group(r)], nodes)
            rank_tokens[r] = distinct_counts(a.expert, layout.owner, layout.ep)
        if cap is not None:
            cap_max = max(cap_max or 0, cap)
    return LayerRouting(
        per_rank,
        counts,
        dropped,
        rerouted,
        fully,
        cap_max,
        node_tokens if expert_node is not None else None,
        rank_tokens if expert_node is not None else None,
    )
