"""Redundant experts of a scenario (``policies.experts``): the EPLB placement from the
routing's per-layer popularity or observed counts, one layer routed over the replicas,
and the balance figures the summaries report.

The placement is a deterministic function of the scenario (popularity from the stream
``"popularity"``, observed statistics from ``("eplb-statistics", layer)``), so every
workload and every memoized layer cost sees the same one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moesim import rng
from moesim.config.cluster import NodesCluster
from moesim.config.model import ModelConfig
from moesim.config.policies import PoliciesConfig
from moesim.config.scenario import Scenario
from moesim.layout import Layout
from moesim.layout.eplb import ExpertPlacement, max_mean, rebalance, unbalanced_gpu_load
from moesim.routing.distributions import layer_popularities, popularity_at, sample_choices
from moesim.routing.route import LayerRouting, model_groups, route_layer


def ep_nodes(s: Scenario) -> int:
    """Nodes one expert-parallel group spans (1 unless the cluster is made of nodes and
    the group covers whole nodes)."""
    c, ep = s.cluster, s.parallelism.ep
    per = c.accelerators_per_node if isinstance(c, NodesCluster) else ep
    return ep // per if per < ep and ep % per == 0 else 1


def expert_loads(s: Scenario) -> np.ndarray:
    """The load the balancer works from, per MoE layer (layers x experts): the routing's
    popularity, or the counts of ``statistics_tokens`` routed tokens per layer."""
    m = s.model
    layers = len(m.moe_layer_indices)
    pops = layer_popularities(s.routing, m.experts, layers, rng.stream(s.seed, "popularity"))
    n = s.policies.experts.statistics_tokens
    if n is None:
        return np.asarray(pops, dtype=float)
    out = np.zeros_like(pops, dtype=float)
    for layer, p in enumerate(pops):
        ranking, _ = sample_choices(
            rng.stream(s.seed, "eplb-statistics", layer), p, n, m.top_k, model_groups(m)
        )
        out[layer] = np.bincount(ranking.ravel(), minlength=m.experts)
    return out


def place(s: Scenario, loads: np.ndarray) -> ExpertPlacement:
    """EPLB over ``loads`` (layers x experts) for the scenario's slots and EP group
    (identical layers are balanced once)."""
    m, p, cfg = s.model, s.parallelism, s.policies.experts
    rows, inverse = np.unique(loads, axis=0, return_inverse=True)
    placed = rebalance(
        rows, m.experts + cfg.redundant, m.expert_groups or 1, ep_nodes(s), p.ep, cfg.policy
    )
    idx = np.asarray(inverse).reshape(-1)
    return ExpertPlacement(
        placed.phy2log[idx], placed.replica[idx], placed.count[idx], placed.gpus, placed.policy
    )


def expert_placement(s: Scenario) -> ExpertPlacement | None:
    """The scenario's replica placement; None without redundant experts."""
    if s.policies.experts.redundant == 0:
        return None
    return place(s, expert_loads(s))


def route_replicated(
    gen: np.random.Generator,
    placement: ExpertPlacement,
    layer: int,
    popularity: np.ndarray,
    layout: Layout,
    tokens: int,
    model: ModelConfig,
    policies: PoliciesConfig,
    expert_node: np.ndarray | None = None,
    choices: tuple[np.ndarray, np.ndarray] | None = None,
) -> LayerRouting:
    """:func:`moesim.routing.route.route_layer` over replicas: the tokens choose logical
    experts (sampled from ``popularity``, or ``choices``), each choice goes to one of its
    expert's slots in ``layer``'s placement, and capacity applies per slot
    (``capacity_factor x tokens x top_k / slots``). The counts are per slot."""
    depth = model.experts if policies.overflow == "reroute" else model.top_k
    if choices is None:
        choices = sample_choices(gen, popularity, tokens, depth, model_groups(model))
    ranking, scores = choices
    slots = placement.physical(layer % placement.phy2log.shape[0], ranking, model.top_k)
    slot_model = model.model_copy(update={"experts": layout.experts})
    return route_layer(
        gen, popularity, layout, tokens, slot_model, policies, expert_node, (slots, scores)
    )


def drift_balance(s: Scenario, horizon_s: float, points: int = 64) -> dict[str, Any] | None:
    """Under ``routing.drift``, mean max/mean GPU load over ``[0, horizon_s)`` of the
    placement kept from t = 0 and of one re-balanced every ``interval_s`` (from the
    popularity at the re-balance); None without drift or interval."""
    cfg = s.policies.experts
    if s.routing.drift is None or cfg.interval_s is None or cfg.redundant == 0:
        return None
    base = expert_loads(s)
    base = base / base.sum(axis=1, keepdims=True)
    start = place(s, base)
    kept, moved = [], []
    cache: dict[int, ExpertPlacement] = {}
    for t in (np.arange(points) + 0.5) * horizon_s / points:
        load = np.vstack([popularity_at(s.routing, p, float(t)) for p in base])
        k = int(t // cfg.interval_s)
        if k not in cache:
            at = k * cfg.interval_s
            cache[k] = place(s, np.vstack([popularity_at(s.routing, p, at) for p in base]))
        kept.append(max_mean(start.gpu_load(load)))
        moved.append(max_mean(cache[k].gpu_load(load)))
    return {
        "interval_s": cfg.interval_s,
        "horizon_s": horizon_s,
        "rebalances": len(cache),
        "max_mean_gpu_load_static": float(np.mean(kept)),
        "max_mean_gpu_load_rebalanced": float(np.mean(moved)),
    }


def balance_summary(s: Scenario, horizon_s: float | None = None) -> dict[str, Any] | None:
    """The replicas' expected balance against no balancing (None without replicas):
    mean over MoE layers of max/mean GPU load, expected from the routing popularity."""
    placement = expert_placement(s)
    if placement is None:
        return None
    cfg, m, p = s.policies.experts, s.model, s.parallelism
    m_layers = len(m.moe_layer_indices)
    pops = layer_popularities(s.routing, m.experts, m_layers, rng.stream(s.seed, "popularity"))
    out: dict[str, Any] = {
        "balancer": cfg.balancer,
        "policy": placement.policy,
        "redundant": cfg.redundant,
        "slots_per_gpu": placement.slots // p.ep,
        "load_source": "popularity"
        if cfg.statistics_tokens is None
        else f"{cfg.statistics_tokens} observed tokens per layer",
        "max_mean_gpu_load": max_mean(placement.gpu_load(pops)),
        "max_mean_gpu_load_unbalanced": max_mean(unbalanced_gpu_load(pops, p.ep)),
        "max_replicas": int(placement.count.max()),
        "experts_per_gpu_unbalanced": math.ceil(m.experts / p.ep),
    }
    if horizon_s is not None:
        drift = drift_balance(s, horizon_s)
        if drift is not None:
            out["drift"] = drift
    return out
