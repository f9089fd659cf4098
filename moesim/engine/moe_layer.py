"""One MoE layer on the devices of one pipeline stage: route, dispatch, experts, combine.

This is the per-layer cost path. The ``layer`` workload runs it once; training and serving
run it for every MoE layer of every (micro)batch, so a change to how an MoE layer is costed
shows up in all of them. Routing is vectorized numpy per rank; the timeline is SimPy:
each rank computes its gate, sends its tokens to the experts' devices (flows on the shared
network), each expert device runs its grouped GEMMs once all its tokens have arrived, and
sends results back; the layer ends when every rank has combined its tokens.

A direct all-to-all phase with at least ``LayerCosts.bulk_a2a_min_flows`` messages (an
expert-parallel group of 64 ranks or more) is priced in batches by
:class:`moesim.engine.bulk_exchange.BulkExchange` (one event per receiver, per-link fair
sharing) instead of flow by flow. DeepEP's kernels (``a2a: deepep``) are always priced per
instant as vectors (:mod:`moesim.engine.deepep`). The hierarchical algorithm uses whichever
network back-end they are given (:class:`moesim.engine.netapi.Network`); the layer
simulation builds one that prices each instant's flows as one batch for layers of that
size (:func:`moesim.engine.layer_sim.layer_network`, by :func:`dispatch_messages`; within
2% of flow by flow on DeepSeek-V3 EP 32, ``tests/test_fluid.py``), and a flow-by-flow one
for smaller layers. :func:`run_layer` never changes the network it is given.

With capacity-padded experts (``policies.expert_compute: padded``,
:class:`moesim.cost.padded.PaddedExperts`) every rank sends every expert its full
``groups x capacity`` rows, kept tokens or padding, the expert devices compute all of
them, the gate/permute phase builds the one-hot masks and runs the dispatch einsum instead
of a gather, and the combine phase runs the combine einsum instead of a scatter.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import simpy

from moesim.config.parallelism import A2AAlgorithm
from moesim.cost.deepep import kernel as deepep_kernel
from moesim.cost.layer_inputs import LayerCosts
from moesim.cost.padded import PaddedExperts
from moesim.engine.bulk_exchange import BulkExchange
from moesim.engine.deepep import DeepEPExchange, layer_exchanges
from moesim.engine.deepep import traffic as deepep_traffic
from moesim.engine.exchange import Exchange
from moesim.engine.netapi import Network
from moesim.layout import Layout
from moesim.routing.route import LayerRouting


@dataclass(frozen=True)
class Interval:
    """A span of simulated time on one device, for timelines and breakdowns."""

    device: int
    lane: str
    name: str
    start_s: float
    end_s: float


@dataclass
class LayerTimeline:
    """What happened on each device during one simulated layer."""

    devices: int
    intervals: list[Interval] = field(default_factory=list)
    ready_s: dict[int, float] = field(default_factory=dict)
    """When each expert device had received all of its tokens."""
    expert_start_s: dict[int, float] = field(default_factory=dict)
    expert_end_s: dict[int, float] = field(default_factory=dict)
    rank_done_s: dict[int, float] = field(default_factory=dict)
    """When each source rank had its combined output."""
    gate_end_s: dict[int, float] = field(default_factory=dict)
    last_combine_from: dict[int, int] = field(default_factory=dict)
    """For each source rank, the expert device whose result arrived last."""
    senders_of: dict[int, list[int]] = field(default_factory=dict)
    """For each expert device, the source ranks that sent it tokens."""
    expert_loads: dict[int, np.ndarray] = field(default_factory=dict)
    """Tokens each expert device processed per local expert (every etp shard of an
    expert processes all of that expert's tokens)."""
    remote_tokens: int = 0
    """Token slots dispatched to another device (a slot whose expert is on its own device
    moves nothing); the combine returns as many."""
    start_s: float = 0.0
    """When the layer started (simulated clock); the times above are absolute."""
    dispatch_einsum_s: dict[int, float] = field(default_factory=dict)
    """Padded layers: each source rank's mask building and dispatch einsum (inside its
    gate/permute phase); empty for grouped layers."""
    combine_einsum_s: dict[int, float] = field(default_factory=dict)
    """Padded layers: each source rank's combine einsum (its combine phase)."""


def _per_ep_rank(counts: np.ndarray, layout: Layout) -> np.ndarray:
    """``counts`` (ranks x experts) summed over each EP rank's experts (ranks x ep): a
    float64 product through BLAS, exact for counts below 2**53."""
    onehot = np.zeros((layout.experts, layout.ep))
    onehot[np.arange(layout.experts), layout.owner] = 1.0
    return np.rint(counts.astype(np.float64) @ onehot).astype(np.int64)


def traffic_arrays(
    routing: LayerRouting, layout: Layout, stage: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Dispatch messages as arrays and expert loads per expert device.

    Returns ``(src, dst, tokens)`` of every non-empty (source rank, expert device) pair,
    ordered by source rank, then EP rank, then etp shard, and ``loads[dst] = tokens per
    local expert`` for every expert device of the stage, ascending (every etp shard of an
    expert receives all of that expert's tokens).
    """
    ep, etp = layout.ep, layout.etp
    ranks = layout.stage_ranks
    per_ep = _per_ep_rank(routing.counts, layout)  # (ranks x ep) slots of each rank per EP rank
    local = np.arange(ranks)
    base = (local // (ep * etp)) * ep * etp  # first rank of each rank's edp group
    dst_local = base[:, None, None] + (np.arange(ep) * etp)[None, :, None] + np.arange(etp)
    tokens = np.broadcast_to(per_ep[:, :, None], dst_local.shape)
    src = np.broadcast_to(local[:, None, None], dst_local.shape)
    keep = tokens.ravel() > 0
    offset = layout.device(stage, 0)
    group_counts = routing.counts.reshape(layout.edp, ep * etp, layout.experts).sum(axis=1)
    loads: dict[int, np.ndarray] = {}
    for g in range(layout.edp):
        for q in range(ep):
            row = group_counts[g, layout.local_experts(q)]
            for dev in layout.expert_devices(stage, g, q):
                loads[dev] = row.copy()
    return (
        src.ravel()[keep] + offset,
        dst_local.ravel()[keep] + offset,
        tokens.ravel()[keep].astype(np.int64),
        dict(sorted(loads.items())),
    )


def sent_routing(routing: LayerRouting, padded: PaddedExperts | None) -> LayerRouting:
    """What the exchanges and experts carry: the kept slots, or with padded experts every
    rank's full ``groups x capacity`` rows for every expert (fixed-size buffers are not
    deduplicated per node, so ``node_tokens`` is dropped and DeepEP sends them directly)."""
    if padded is None:
        return routing
    return replace(routing, counts=padded.rows(routing.tokens_per_rank), node_tokens=None)


def dispatch_messages(routing: LayerRouting, layout: Layout) -> int:
    """How many messages one all-to-all phase of the layer has: the length of
    :func:`traffic_arrays`' message arrays (non-empty (source rank, expert device) pairs),
    without building them."""
    return int(np.count_nonzero(_per_ep_rank(routing.counts, layout))) * layout.etp


def _group_by(keys: np.ndarray, values: np.ndarray) -> dict[int, list[int]]:
    """``values`` listed under their ``keys``, in order."""
    order = np.argsort(keys, kind="stable")
    uniq, starts = np.unique(keys[order], return_index=True)
    parts = np.split(values[order], starts[1:]) if len(keys) else []
    return {int(k): p.tolist() for k, p in zip(uniq, parts)}


def run_layer(
    env: simpy.Environment,
    net: Network,
    compute: list[simpy.Resource],
    costs: LayerCosts,
    routing: LayerRouting,
    layout: Layout,
    stage: int,
    timeline: LayerTimeline,
    padded: PaddedExperts | None = None,
) -> Generator[simpy.Event, Any, None]:
    """SimPy process: one MoE layer forward pass on one stage, from now until combined.

    The exchanges run on ``net`` as built (flow by flow or in per-instant batches, the
    caller's choice by the layer's size; :func:`moesim.engine.layer_sim.layer_network`).
    ``padded``: capacity-padded experts (None: grouped GEMMs over the kept tokens).
    """
    timeline.start_s = float(env.now)
    m = costs.model
    rf = costs.roofline
    routing = sent_routing(routing, padded)
    src_a, dst_a, tok_a, loads = traffic_arrays(routing, layout, stage)
    timeline.expert_loads = loads
    timeline.remote_tokens = int(tok_a[src_a != dst_a].sum())
    d_ff_shard = m.expert_d_ff // layout.etp
    senders = _group_by(dst_a, src_a)
    timeline.senders_of = {d: senders.get(d, []) for d in loads}
    first = layout.device(stage, 0)
    slots_of = np.bincount(src_a - first, weights=tok_a, minlength=layout.stage_ranks)
    topo = costs.topology
    algo: A2AAlgorithm = costs.a2a if topo is not None else "direct"
    node_of = topo.node_of if topo is not None else ()
    local_of = topo.local_of if topo is not None else ()
    device_at = topo.device_at if topo is not None else {}
    dispatch: Exchange | DeepEPExchange | BulkExchange
    combine: Exchange | DeepEPExchange | BulkExchange
    plain: A2AAlgorithm = "direct" if algo == "deepep" else algo
    deepep = algo == "deepep" and routing.node_tokens is not None and topo is not None
    host_s = costs.ep_host_overhead_s
    fused = False  # the permute and the weighted combine run inside the exchange's kernels
    if deepep and topo is not None:
        # DeepEP's kernels (moesim.engine.deepep): no NCCL alpha; the low-latency kernels
        # use fixed-size buffers, so no host read of the split sizes either, and they
        # gather the tokens into per-expert buffers and reduce the combine themselves (the
        # fitted kernel times include both), so no permute or scatter kernel on the rank
        kernel = deepep_kernel(costs.a2a_mode or "normal")
        t = deepep_traffic(routing, layout, stage, topo, src_a, dst_a, tok_a)
        dispatch, combine = layer_exchanges(env, net, kernel, m, t)
        if kernel.mode == "low_latency":
            host_s, fused = 0.0, True
    elif plain == "direct" and len(src_a) >= costs.bulk_a2a_min_flows:
        dispatch = BulkExchange(
            env,
            net,
            src_a,
            dst_a,
            tok_a * float(costs.dispatch_bytes_per_token),
            costs.a2a_overhead_s,
        )
        combine = BulkExchange(
            env,
            net,
            dst_a,
            src_a,
            tok_a * float(costs.combine_bytes_per_token),
            costs.a2a_overhead_s,
        )
    else:
        # relayed (hierarchical) exchanges need per-flow delivery events (a relay forwards
        # once its contributions are in); large ones run on a network that prices them in
        # per-instant batches (chosen where the network is built)
        triples = list(zip(src_a.tolist(), dst_a.tolist(), tok_a.tolist()))
        dispatch_msgs = [(s, d, n * costs.dispatch_bytes_per_token) for s, d, n in triples]
        combine_msgs = [(d, s, n * costs.combine_bytes_per_token) for s, d, n in triples]
        dispatch = Exchange(
            env, net, dispatch_msgs, plain, node_of, device_at, local_of, costs.a2a_overhead_s
        )
        combine = Exchange(
            env, net, combine_msgs, plain, node_of, device_at, local_of, costs.a2a_overhead_s
        )

    def source(local: int) -> Generator[simpy.Event, Any, None]:
        src = layout.device(stage, local)
        n_tok = int(routing.tokens_per_rank[local])
        slots = int(slots_of[local])
        with compute[src].request() as req:
            yield req
            t0 = env.now
            gate = float(rf.gemm_s(n_tok, m.d_model, m.experts)) if n_tok else 0.0
            gate += rf.routing_s(n_tok, m.experts, m.top_k)
            if padded is None:
                permute = 0.0 if fused else rf.gather_s(slots, m.d_model)
            else:
                permute = padded.dispatch_s(rf, n_tok, m.d_model)
                timeline.dispatch_einsum_s[src] = permute
            yield env.timeout(gate + permute + host_s)
            timeline.intervals.append(Interval(src, "compute", "gate+permute", t0, env.now))
        timeline.gate_end_s[src] = env.now
        dispatch.send(src)
        if m.shared_experts and n_tok:
            with compute[src].request() as req:
                yield req
                t0 = env.now
                width = m.shared_d_ff * m.shared_experts
                yield env.timeout(rf.dense_ffn_s(n_tok, m.d_model, width, m.activation))
                timeline.intervals.append(Interval(src, "compute", "shared experts", t0, env.now))
        yield combine.inbound(src)
        last = combine.last_sender(src)
        if last is not None:
            timeline.last_combine_from[src] = last
        if padded is not None and n_tok:
            with compute[src].request() as req:
                yield req
                t0 = env.now
                back = padded.combine_s(rf, n_tok, m.d_model)
                timeline.combine_einsum_s[src] = back
                yield env.timeout(back)
                timeline.intervals.append(Interval(src, "compute", "combine", t0, env.now))
        elif slots and padded is None and not fused:
            with compute[src].request() as req:
                yield req
                t0 = env.now
                yield env.timeout(rf.scatter_s(slots, m.d_model))
                timeline.intervals.append(Interval(src, "compute", "combine", t0, env.now))
        timeline.rank_done_s[src] = env.now

    def expert(dst: int) -> Generator[simpy.Event, Any, None]:
        yield dispatch.inbound(dst)
        timeline.ready_s[dst] = env.now
        with compute[dst].request() as req:
            yield req
            timeline.expert_start_s[dst] = env.now
            # padded or not, the device's expert kernel over the rows it received (a
            # padded layer's loads are its full capacity: moesim.cost.padded)
            # the layer, for a profile's launch pipeline: without expert parallelism a
            # device's whole (unpadded) layer is one pipeline; with it, its experts alone
            own, local = dst - first, layout.ep * layout.etp == 1
            work = rf.grouped_ffn_s(
                loads[dst],
                m.d_model,
                d_ff_shard,
                m.activation,
                costs.expert_kernel,
                model=m if padded is None else None,
                tokens=int(routing.tokens_per_rank[own]) if local else 0,
                slots=int(slots_of[own]) if local else 0,
            )
            yield env.timeout(work)
            timeline.expert_end_s[dst] = env.now
            timeline.intervals.append(
                Interval(dst, "compute", "experts", timeline.expert_start_s[dst], env.now)
            )
        combine.send(dst)

    procs = [env.process(source(local)) for local in range(layout.stage_ranks)]
    for d in loads:
        if senders.get(d):
            env.process(expert(d))
    yield env.all_of(procs)


def critical_path(tl: LayerTimeline) -> dict[str, float]:
    """The layer's critical path in seconds, split into phases that sum to its time.

    It follows the rank that finished last back to the expert device whose results it
    waited for last: gate (+permute) on the senders, dispatch until that device had all its
    tokens, queueing behind other work on it, its expert GEMMs, and the combine back.
    A padded layer also reports, carved out of those phases, ``dispatch_einsum`` (building
    the one-hot masks and the dispatch einsum, inside the gate of the sender that finished
    last) and ``combine_einsum`` (the combine einsum at the end of the combine).
    """
    keys = ("gate", "dispatch", "queue", "compute", "combine")
    if not tl.rank_done_s:
        return dict.fromkeys(keys, 0.0)
    rank = max(tl.rank_done_s, key=lambda d: (tl.rank_done_s[d], -d))
    done = tl.rank_done_s[rank]
    x = tl.last_combine_from.get(rank)
    t0 = tl.start_s
    if x is None:
        sender = rank
        gate = tl.gate_end_s.get(rank, t0)
        path = {
            "gate": gate - t0,
            "dispatch": 0.0,
            "queue": 0.0,
            "compute": 0.0,
            "combine": done - gate,
        }
    else:
        # the senders to x finished their gates before dispatching to it, so ready >= gate
        senders = tl.senders_of.get(x, [])
        sender = max(senders, key=lambda d: (tl.gate_end_s[d], -d), default=rank)
        gate = tl.gate_end_s.get(sender, t0) if senders else t0
        ready = tl.ready_s[x]
        start, end = tl.expert_start_s[x], tl.expert_end_s[x]
        path = {
            "gate": gate - t0,
            "dispatch": ready - gate,
            "queue": start - ready,
            "compute": end - start,
            "combine": done - end,
        }
    if not tl.dispatch_einsum_s:
        return path
    masks = min(tl.dispatch_einsum_s.get(sender, 0.0), path["gate"])
    back = min(tl.combine_einsum_s.get(rank, 0.0), path["combine"])
    return {
        "gate": path["gate"] - masks,
        "dispatch_einsum": masks,
        "dispatch": path["dispatch"],
        "queue": path["queue"],
        "compute": path["compute"],
        "combine": path["combine"] - back,
        "combine_einsum": back,
    }
