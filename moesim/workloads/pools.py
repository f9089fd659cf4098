"""Prefill/decode pools of a serving workload (``workload.pools``, issue 16): each pool's
scenario (its instance's nodes, layout and scheduler), its rules, and the run.

A pool's scenario is the workload's scenario with the cluster cut to one instance's
nodes, the pool's parallelism and scheduler, and no pools: the co-located serving rules
(shape, memory, replicas) then apply to it unchanged, their errors located at the pool's
fields. The engine (:mod:`moesim.engine.pools`) runs one serving loop per instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moesim.config.cluster import NodesCluster
from moesim.config.parallelism import ParallelismConfig
from moesim.config.pools import PoolConfig, PoolsConfig
from moesim.config.routing import LogitsRouting, TraceRouting
from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.workloads.base import Rule
from moesim.workloads.replica_rules import replica_rules

if TYPE_CHECKING:
    from moesim.engine.pools import PoolRecords
    from moesim.system import System

POOLS = ("prefill", "decode")


def pools_of(s: Scenario) -> PoolsConfig | None:
    """The scenario's pools, None when it serves co-located (or is no serving run)."""
    w = s.workload
    return w.pools if isinstance(w, ServingWorkload) else None


def pool_scenario(s: Scenario, name: str) -> Scenario:
    """The scenario of one instance of pool ``name``: its nodes, layout, scheduler."""
    w = s.workload
    assert isinstance(w, ServingWorkload) and w.pools is not None
    assert isinstance(s.cluster, NodesCluster)
    pool: PoolConfig = getattr(w.pools, name)
    over = {k: v for k, v in pool.scheduler.model_dump().items() if v is not None}
    sub_w = w.model_copy(
        update={
            "pools": None,
            "scheduler": w.scheduler.model_copy(update=over),
            "kv_cache_fraction": pool.kv_cache_fraction or w.kv_cache_fraction,
        }
    )
    nodes = max(pool.parallelism.devices // s.cluster.accelerators_per_node, 1)
    return s.model_copy(
        update={
            "name": f"{s.name}.{name}",
            "cluster": s.cluster.model_copy(update={"nodes": nodes}),
            "parallelism": pool.parallelism,
            "workload": sub_w,
        }
    )


def _relocate(path: str, name: str) -> str:
    """A co-located rule's field path, as the pool's field when the pool sets it."""
    at = f"workload.pools.{name}"
    if path == "parallelism" or path.startswith("parallelism."):
        return f"{at}.{path}"
    if path == "workload.kv_cache_fraction":
        return f"{at}.kv_cache_fraction"
    if path.startswith("workload.scheduler."):
        return f"{at}.scheduler.{path.removeprefix('workload.scheduler.')}"
    return path


def pool_rules(s: Scenario, pools: PoolsConfig) -> Rule:
    """Pools fit the cluster on whole nodes, each pool's layout is one serving instance
    the co-located rules accept, and the features pools do not model yet are refused."""
    from moesim.workloads.serving import serving_shape

    c = s.cluster
    if not isinstance(c, NodesCluster):
        yield "workload.pools", f"pools need a cluster of nodes, got kind {c.kind!r}"
        return
    if s.parallelism != ParallelismConfig():
        yield (
            "parallelism",
            "with workload.pools each pool has its own parallelism "
            "(workload.pools.prefill.parallelism, ...): leave the top-level one out",
        )
    if s.failures is not None:
        yield "failures", "failures with prefill/decode pools are not modelled yet"
    if s.policies.offload.experts is not None:
        yield "policies.offload.experts", "expert offloading with pools is not modelled yet"
    if isinstance(s.routing, TraceRouting | LogitsRouting):
        yield "routing.kind", f"{s.routing.kind!r} routing with pools is not modelled yet"
    per_node, used, ok = c.accelerators_per_node, 0, True
    m = s.model
    for name in POOLS:
        pool: PoolConfig = getattr(pools, name)
        p, at = pool.parallelism, f"workload.pools.{name}"
        used += pool.instances * p.devices
        if p.pp != 1:
            yield f"{at}.parallelism.pp", f"pipeline parallelism is not modelled, got {p.pp}"
            ok = False
        elif p.devices % per_node:
            yield (
                f"{at}.parallelism",
                f"an instance must fill whole nodes: dp x tp = {p.dp} x {p.tp} = {p.devices} "
                f"devices is not a multiple of the {per_node} accelerators per node",
            )
            ok = False
        if (p.dp * p.tp) % (p.ep * p.etp):
            yield (
                f"{at}.parallelism.ep",
                f"ep x etp = {p.ep * p.etp} must divide dp x tp = {p.dp * p.tp}",
            )
            ok = False
        if m.expert_d_ff % p.etp:
            yield f"{at}.parallelism.etp", f"must divide model.expert_d_ff ({m.expert_d_ff})"
            ok = False
        if isinstance(p.placement, list):
            yield f"{at}.parallelism.placement", "an explicit placement with pools is not modelled"
            ok = False
    if used > c.devices:
        yield (
            "workload.pools",
            f"the pools need {used} devices (prefill {pools.prefill.instances} x "
            f"{pools.prefill.parallelism.devices} + decode {pools.decode.instances} x "
            f"{pools.decode.parallelism.devices}) but the cluster has {c.devices} "
            f"({c.nodes} nodes of {per_node}): raise cluster.nodes",
        )
    if not ok:
        return
    for name in POOLS:
        sub = pool_scenario(s, name)
        sub_w = sub.workload
        assert isinstance(sub_w, ServingWorkload)
        for path, msg in [*replica_rules(sub), *serving_shape(sub, sub_w)]:
            if path.startswith(("parallelism", "workload.")) or path == "policies.experts.policy":
                yield _relocate(path, name), f"{name} pool: {msg}"
        sch = sub_w.scheduler
        longest = sub_w.longest_request_tokens
        if not sch.chunked_prefill and (longest is None or longest > sch.max_batch_tokens):
            yield (
                f"workload.pools.{name}.scheduler.chunked_prefill",
                f"without chunked prefill every request must fit max_batch_tokens "
                f"({sch.max_batch_tokens}); the longest is "
                f"{'unbounded' if longest is None else longest} tokens",
            )


def simulate_pooled(system: System) -> PoolRecords:
    """Run a scenario with pools: one system per pool, the whole cluster's paths for the
    KV transfers."""
    from moesim.engine.pools import PoolSpec, simulate_pools
    from moesim.system import build_system

    s = system.scenario
    pools = pools_of(s)
    assert pools is not None
    first = 0
    specs = []
    for name in POOLS:
        pool: PoolConfig = getattr(pools, name)
        sub = build_system(pool_scenario(s, name))
        specs.append(PoolSpec(sub, pool.instances, first, pool.micro_batches))
        first += pool.instances * pool.parallelism.devices
    return simulate_pools(
        system.paths, specs[0], specs[1], pools.route, pools.prefix_cache_hit_fraction
    )
