"""Failures over a run: the event plan, the system in each failure state, and the serving
side of failure and recovery.

**The plan** (:func:`build_plan`) turns the ``failures`` section into a time-ordered list
of events and a piecewise-constant *failure state* (dead devices, slow devices, degraded
links). Device failures are drawn before the run from per-device streams
``rng.stream(seed, "failures", process, device)``: each device alternates up periods
(time to failure from each of its processes, the earliest wins) and down periods (a hot
spare's swap time when one is free, else the repair time; the repaired device then
becomes a spare again). The failure processes run on wall-clock time whatever the job
does, so the same seed gives the same failures to every workload and every recovery
policy (common random numbers: policies are compared on the same failures).

**A failure state's system** (:func:`degraded_system`) is a new :class:`System`, never a
mutated one: degraded links get their bandwidth scaled (down links are removed, so paths
are recomputed and traffic takes another route when there is one; a device left without
a route is treated as dead), and the layout (:class:`FailedLayout`) gives no tokens to
data-parallel ranks with a dead device and carries the replica experts as extra columns
owned by the next EP rank.

**The MoE layer under failure** (:class:`FailedMoECost`) runs the same per-layer path
(route -> dispatch -> experts -> combine) with the routing outcome changed for the
experts of dead devices, per expert-data-parallel group:

- ``replica``: their slots go to the replica (whose device then runs more tokens and one
  more expert, so the layer gets slower); a slot whose replica is also dead is dropped;
- ``reroute``: tokens choose again among the live experts only. With Gumbel-top-k
  sampling this is exactly "the next choice" (the same noise, the dead experts removed
  from the ranking), so the routing is redrawn from the same stream with the dead
  experts' popularity set to zero;
- ``drop``: their slots fall to the residual.

The same routing streams as the healthy layer are used (common random numbers), so a
state's cost differs from the healthy one by the failure only.

**Stragglers** multiply the compute of their device. The ranks run in lock-step, so an
iteration's attention, dense and head parts (with their TP collectives: an upper bound
for tp > 1) take the slowest busy rank's factor. In an MoE layer the straggler's own
compute (gate, experts, combine: its busy time in the simulated layer) grows by the
factor, and the layer by that growth, the worst straggler's: exact when the straggler is
on the layer's critical path (balanced load), which the lock-step makes the usual case.

**Serving** (:class:`ServingFailures`, hooked into :mod:`moesim.engine.serving`): state
changes take effect at iteration boundaries (the iteration in flight when a device fails
completes). Until a failure is noticed (``recovery.detect_s``) the server stalls: every
rank waits on the dead device's collectives. When a data-parallel rank loses a device,
its running and waiting requests are requeued at the front of the live ranks' queues
(their KV is lost and recomputed, counted like a preemption) or lost; new requests go
round-robin to live ranks; with no live rank the server waits for a recovery. A
recovered device rejoins with an empty KV cache.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from moesim import rng
from moesim.config.failures import (
    ExponentialFailures,
    FailuresConfig,
    ScheduledFailure,
    WeibullFailures,
)
from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.cost.layer_cost import LayerSample, MoELayerCost, bucket_points
from moesim.derived.replica_memory import replica_bytes, replica_experts, replica_owner
from moesim.derived.serving_memory import ServingMemory
from moesim.engine.layer_sim import layer_run, simulate_routed_layer
from moesim.layout import Layout
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System
from moesim.topology.graph import Topology
from moesim.topology.paths import PathTable

if TYPE_CHECKING:
    from moesim.cost.iteration import IterationCost, IterationTime
    from moesim.engine.batching import RankScheduler, RequestState

HOUR = 3600.0


# --- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureEvent:
    """One thing that happened: a device failing or coming back, a link or a straggler
    window opening or closing."""

    time_s: float
    kind: str
    """fail, detected, recover, link_degraded, link_restored, straggler_start,
    straggler_end; ignored (a scheduled failure of a device already down: no effect)."""
    device: int
    detail: str = ""


@dataclass(frozen=True)
class FailureState:
    """What is broken during one stretch of the run."""

    dead: frozenset[int] = frozenset()
    """Failed devices."""
    slow: tuple[tuple[int, float], ...] = ()
    """(device, slowdown) of the stragglers."""
    links: tuple[tuple[int, str, float], ...] = ()
    """(device, scale_up | nic | all, bandwidth fraction; 0 = down)."""
    stalled: frozenset[int] = frozenset()
    """Dead devices not noticed yet (``recovery.detect_s``): everyone waits on them."""

    @property
    def healthy(self) -> bool:
        return not (self.dead or self.slow or self.links)

    def slowdown(self, device: int) -> float:
        return max((f for d, f in self.slow if d == device), default=1.0)

    def describe(self) -> str:
        if self.healthy:
            return "healthy"
        parts = []
        if self.dead:
            parts.append("dead " + ",".join(map(str, sorted(self.dead))))
        if self.stalled:
            parts.append("not yet detected: all wait")
        for d, f in self.slow:
            parts.append(f"device {d} x{f:g} slower")
        for d, k, f in self.links:
            parts.append(f"device {d} {k} {'down' if f == 0 else f'at {f:g}'}")
        return "; ".join(parts)


@dataclass(frozen=True)
class FailurePlan:
    """The events of a run and the failure state between them (state ``i`` holds from
    ``starts[i]`` to ``starts[i + 1]``)."""

    events: tuple[FailureEvent, ...]
    starts: tuple[float, ...]
    states: tuple[FailureState, ...]
    horizon_s: float

    def index_at(self, t: float) -> int:
        return bisect.bisect_right(self.starts, t) - 1

    def at(self, t: float) -> FailureState:
        return self.states[self.index_at(t)]

    def next_change(self, t: float) -> float:
        """The first state change after ``t`` (inf if none)."""
        i = bisect.bisect_right(self.starts, t)
        return self.starts[i] if i < len(self.starts) else math.inf

    def spans(self) -> list[tuple[float, float, FailureState]]:
        ends = (*self.starts[1:], self.horizon_s)
        return [(a, max(a, b), s) for a, b, s in zip(self.starts, ends, self.states)]

    @property
    def device_failures(self) -> int:
        return sum(1 for e in self.events if e.kind == "fail")


def _ttf_s(cfg: ExponentialFailures | WeibullFailures, gen: np.random.Generator) -> float:
    mean = cfg.mtbf_hours * HOUR
    if isinstance(cfg, ExponentialFailures):
        return float(gen.exponential(mean))
    scale = mean / math.gamma(1.0 + 1.0 / cfg.shape)
    return float(scale * gen.weibull(cfg.shape))


def device_events(
    cfg: FailuresConfig, devices: int, seed: int, horizon_s: float
) -> list[FailureEvent]:
    """Device failures and recoveries over ``[0, horizon_s)`` (see the module docstring)."""
    rec = cfg.recovery
    procs = [
        (i, p, range(devices) if p.devices is None else p.devices)
        for i, p in enumerate(cfg.devices)
        if not isinstance(p, ScheduledFailure)
    ]
    by_device: dict[int, list[tuple[int, ExponentialFailures | WeibullFailures]]] = {}
    for i, p, devs in procs:
        assert not isinstance(p, ScheduledFailure)
        for d in devs:
            by_device.setdefault(d, []).append((i, p))
    gens = {
        (i, d): rng.stream(seed, "failures", i, d) for d, ps in by_device.items() for i, _ in ps
    }
    heap: list[tuple[float, int, str, int, int]] = []  # time, order, kind, device, generation
    order = 0

    def push(t: float, kind: str, d: int, gen_no: int = -1) -> None:
        nonlocal order
        if t < horizon_s:
            heapq.heappush(heap, (t, order, kind, d, gen_no))
            order += 1

    generation = dict.fromkeys(range(devices), 0)

    def arm(d: int, t: float) -> None:
        ps = by_device.get(d)
        if ps:
            push(t + min(_ttf_s(p, gens[(i, d)]) for i, p in ps), "fail", d, generation[d])

    for d in range(devices):
        arm(d, 0.0)
    for sched in cfg.devices:
        if isinstance(sched, ScheduledFailure):
            push(sched.at_s, "fail", sched.device)
    up = [True] * devices
    spares = rec.hot_spares
    out: list[FailureEvent] = []
    while heap:
        t, _, kind, d, gen_no = heapq.heappop(heap)
        if kind == "fail":
            if gen_no >= 0 and gen_no != generation[d]:
                continue  # a time to failure drawn before the device's last failure
            if not up[d]:  # only a scheduled failure can hit a device that is down
                out.append(FailureEvent(t, "ignored", d, "ignored: device already down"))
                continue
            up[d] = False
            generation[d] += 1
            noticed = t + rec.detect_s
            if rec.detect_s > 0:
                push(noticed, "detected", d)
            if spares > 0:
                spares -= 1
                out.append(FailureEvent(t, "fail", d, "a hot spare takes over"))
                push(noticed + rec.spare_swap_s, "recover", d)
                if rec.repair_s is not None:
                    push(noticed + rec.repair_s, "spare_back", d)
            else:
                out.append(
                    FailureEvent(
                        t, "fail", d, "no spare: repair" if rec.repair_s else "no spare, no repair"
                    )
                )
                if rec.repair_s is not None:
                    push(noticed + rec.repair_s, "recover", d)
        elif kind == "detected":
            out.append(FailureEvent(t, "detected", d))
        elif kind == "recover":
            up[d] = True
            out.append(FailureEvent(t, "recover", d))
            arm(d, t)
        else:  # spare_back: the repaired device joins the spare pool
            spares += 1
    return out


def build_plan(system: System, horizon_s: float) -> FailurePlan:
    """Every failure event of the run and the states between them."""
    s = system.scenario
    cfg = s.failures or FailuresConfig()
    n = len(system.topology.devices)
    events = device_events(cfg, n, s.seed, horizon_s)
    for link in cfg.links:
        frac = 0.0 if link.down else link.bandwidth_fraction
        what = f"{link.link} {'down' if link.down else f'at {frac:g} of its bandwidth'}"
        events.append(FailureEvent(link.at_s, "link_degraded", link.device, what))
        if link.until_s is not None:
            events.append(FailureEvent(link.until_s, "link_restored", link.device, link.link))
    for sg in cfg.stragglers:
        events.append(
            FailureEvent(sg.from_s, "straggler_start", sg.device, f"x{sg.slowdown:g} slower")
        )
        if sg.until_s is not None:
            events.append(FailureEvent(sg.until_s, "straggler_end", sg.device))
    events = sorted((e for e in events if e.time_s < horizon_s), key=lambda e: e.time_s)
    times = sorted({0.0, *(e.time_s for e in events)})
    states: list[FailureState] = []
    dead_at: list[frozenset[int]] = []
    stalled_at: list[frozenset[int]] = []
    dead: set[int] = set()
    stalled: set[int] = set()
    it = iter(events)
    pending = next(it, None)
    for t in times:
        while pending is not None and pending.time_s <= t:
            if pending.kind == "fail":
                dead.add(pending.device)
                if cfg.recovery.detect_s > 0:
                    stalled.add(pending.device)
            elif pending.kind == "detected":
                stalled.discard(pending.device)
            elif pending.kind == "recover":
                dead.discard(pending.device)
                stalled.discard(pending.device)
            pending = next(it, None)
        dead_at.append(frozenset(dead))
        stalled_at.append(frozenset(stalled))
    for t, dead_now, stalled_now in zip(times, dead_at, stalled_at):
        slow = tuple(
            (x.device, x.slowdown)
            for x in cfg.stragglers
            if x.from_s <= t and (x.until_s is None or t < x.until_s) and x.device not in dead_now
        )
        links = tuple(
            (x.device, x.link, 0.0 if x.down else x.bandwidth_fraction)
            for x in cfg.links
            if x.at_s <= t and (x.until_s is None or t < x.until_s)
        )
        state = FailureState(dead_now, slow, links, stalled_now)
        if links:
            cut = unreachable(system.topology, state)
            if cut - dead_now:
                state = replace(state, dead=dead_now | cut)
        states.append(state)
    # merge stretches whose state does not change
    starts: list[float] = []
    merged: list[FailureState] = []
    for t, st in zip(times, states):
        if not merged or merged[-1] != st:
            starts.append(t)
            merged.append(st)
    return FailurePlan(tuple(events), tuple(starts), tuple(merged), horizon_s)


# --- degraded systems -------------------------------------------------------------------


def link_edges(topo: Topology, device: int, which: str) -> list[tuple[str, str]]:
    """The directed edges of a device's scale-up ports, its NIC's fabric port, or all."""
    g = topo.graph
    me = topo.devices[device]
    kind = nx.get_node_attributes(g, "kind")
    out: list[tuple[str, str]] = []
    nics = [v for v in g.successors(me) if kind[v] == "nic"]
    for v in g.successors(me):
        scale_up = kind[v] == "device" or (kind[v] == "switch" and v.endswith(".nvswitch"))
        if which == "all" or (which == "scale_up" and scale_up):
            out += [(me, v), (v, me)]
    if which in ("nic", "all"):
        for nic in nics:
            for v in g.successors(nic):
                if kind[v] == "switch":
                    out += [(nic, v), (v, nic)]
    return out


def degraded_topology(topo: Topology, state: FailureState) -> Topology:
    """A copy of the topology with the state's links scaled or removed (a dead device's
    links are left alone: it carries no traffic, and its peers keep a route to it)."""
    if not state.links:
        return topo
    g = topo.graph.copy()
    for device, which, frac in state.links:
        if device in state.dead:
            continue
        for u, v in link_edges(topo, device, which):
            if not g.has_edge(u, v):
                continue
            if frac == 0.0:
                g.remove_edge(u, v)
            else:
                g[u][v]["bandwidth_gbps"] = g[u][v]["bandwidth_gbps"] * frac
    return replace(topo, graph=g)


def unreachable(topo: Topology, state: FailureState) -> frozenset[int]:
    """Live devices cut off from the largest group of live devices by downed links."""
    if not any(f == 0.0 for _, _, f in state.links):
        return frozenset()
    g = degraded_topology(topo, state).graph
    kind = nx.get_node_attributes(g, "kind")
    und = g.subgraph([n for n in g if kind[n] != "host"]).to_undirected()
    live = [d for d in range(len(topo.devices)) if d not in state.dead]
    comp = {n: i for i, c in enumerate(nx.connected_components(und)) for n in c}
    sizes: dict[int, int] = {}
    for d in live:
        sizes[comp[topo.devices[d]]] = sizes.get(comp[topo.devices[d]], 0) + 1
    if not sizes:
        return frozenset()
    main = max(sizes, key=lambda c: (sizes[c], -c))
    return frozenset(d for d in live if comp[topo.devices[d]] != main)


def kv_blocks_with_replicas(s: Scenario, mem: ServingMemory) -> int:
    """KV blocks of one data-parallel rank once the replicas took their memory."""
    w = s.workload
    assert isinstance(w, ServingWorkload)
    left = mem.device_bytes - mem.weight_bytes - replica_bytes(s)
    tokens = math.floor(w.kv_cache_fraction * max(0, left)) // mem.kv_bytes_per_token
    return int(tokens // w.scheduler.block_tokens)


@dataclass(frozen=True)
class FailedLayout(Layout):
    """A layout with dead data-parallel ranks (no tokens) and replica experts appended as
    columns ``experts_real ..`` owned by the next EP rank of their expert."""

    dead_dp: frozenset[int] = frozenset()
    experts_real: int = 0
    replica_of: tuple[int, ...] = ()
    """The original expert of each replica column."""

    def tokens_per_rank(self, tokens: int) -> np.ndarray:
        alive = [d for d in range(self.dp) if d not in self.dead_dp]
        out = np.zeros(self.stage_ranks, dtype=np.int64)
        if not alive:
            return out
        per = [len(a) for a in np.array_split(np.arange(tokens), len(alive))]
        for d, n in zip(alive, per):
            out[d * self.tp : (d + 1) * self.tp] = [
                len(a) for a in np.array_split(np.arange(n), self.tp)
            ]
        return out


def failed_layout(system: System, dead: frozenset[int]) -> FailedLayout:
    lay = system.layout
    reps = replica_experts(system.scenario)
    owner = np.concatenate([lay.owner, replica_owner(lay.owner, reps, lay.ep)])
    dead_dp = frozenset((d % lay.stage_ranks) // lay.tp for d in dead)
    return FailedLayout(
        lay.dp,
        lay.tp,
        lay.pp,
        lay.ep,
        lay.etp,
        lay.experts + len(reps),
        owner,
        dead_dp,
        lay.experts,
        tuple(reps),
    )


def degraded_system(system: System, state: FailureState) -> System:
    """The system in a failure state (the healthy system itself when nothing is broken)."""
    if state.healthy and not replica_experts(system.scenario):
        return system
    topo = degraded_topology(system.topology, state)
    paths = system.paths if topo is system.topology else PathTable(topo)
    costs = replace(system.layer_costs, topology=topo)
    return replace(
        system,
        topology=topo,
        paths=paths,
        layout=failed_layout(system, state.dead),
        layer_costs=costs,
    )


def lost_ep_ranks(layout: Layout, dead: frozenset[int]) -> dict[int, set[int]]:
    """For each expert-data-parallel group, the EP ranks with a dead device."""
    out: dict[int, set[int]] = {}
    for d in dead:
        local = d % layout.stage_ranks
        out.setdefault(layout.edp_group(local), set()).add((local // layout.etp) % layout.ep)
    return out


# --- the MoE layer under failure --------------------------------------------------------


@dataclass(frozen=True)
class FailureShares:
    """Shares of a layer's token-choice slots affected by a failure."""

    failed_over: float = 0.0
    """Sent to a replica."""
    rerouted: float = 0.0
    """Sent to the token's next live choice."""
    lost: float = 0.0
    """Dropped because their expert (and its replica) was dead."""


@dataclass
class FailedMoECost(MoELayerCost):
    """Expected MoE layer cost by batch size in one failure state (see module docstring).

    ``system`` is the state's degraded system (:func:`degraded_system`)."""

    dead: frozenset[int] = frozenset()
    mode: str = "drop"
    slow: tuple[tuple[int, float], ...] = ()
    """(device, slowdown) of the stragglers."""
    _memo: dict[int, tuple[LayerSample, FailureShares]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        lay = self.system.layout
        assert isinstance(lay, FailedLayout)
        self._lay = lay
        self._lost = lost_ep_ranks(lay, self.dead)

    @property
    def evaluations(self) -> int:
        return len(self._memo)

    def _route(self, tokens: int, i: int, pop: np.ndarray) -> LayerRouting:
        s = self.system.scenario
        return route_layer(
            rng.stream(s.seed, "layer-cost", tokens, i),
            pop,
            self._lay,
            tokens,
            s.model,
            s.policies,
            self.system.expert_node,
        )

    def route(self, tokens: int, i: int) -> tuple[LayerRouting, float, float, float]:
        """One routing sample with the failure applied: the routing and the slots failed
        over, rerouted and lost."""
        lay = self._lay
        e_real = lay.experts_real
        sample_pop = self.sample_popularity(i, self.samples_for(tokens))
        base = self._route(tokens, i, sample_pop)
        rows = {
            g: np.array([r for r in range(lay.stage_ranks) if lay.edp_group(r) == g])
            for g in range(lay.edp)
        }
        lost_experts = {
            g: np.flatnonzero(np.isin(lay.owner[:e_real], sorted(ranks)))
            for g, ranks in self._lost.items()
        }
        counts = np.zeros((lay.stage_ranks, lay.experts), dtype=np.int64)
        counts[:, :e_real] = base.counts
        dropped = base.dropped
        over = rer = lost = 0
        for g, gone in lost_experts.items():
            if not gone.size:
                continue
            r = rows[g]
            on_dead = int(base.counts[np.ix_(r, gone)].sum())
            if self.mode == "reroute":
                pop = sample_pop.copy()
                pop[gone] = 0.0
                again = self._route(tokens, i, pop / pop.sum()) if pop.sum() > 0 else base
                counts[r, :e_real] = again.counts[r]
                still = int(again.counts[np.ix_(r, gone)].sum())
                # capacity drops move with the rerouted slots (exact with one edp group;
                # with several, the change is shared by the groups' token shares)
                dropped += round((again.dropped - base.dropped) * len(r) / lay.stage_ranks)
                rer += on_dead - still
                lost += still
                counts[np.ix_(r, gone)] = 0
                dropped += still
                continue
            if self.mode == "replica":
                for col, e in enumerate(lay.replica_of):
                    if e in gone and int(lay.owner[e_real + col]) not in self._lost[g]:
                        moved = counts[r, e].copy()
                        counts[r, e_real + col] += moved
                        counts[r, e] = 0
                        over += int(moved.sum())
            left = int(counts[np.ix_(r, gone)].sum())
            counts[np.ix_(r, gone)] = 0
            lost += left
            dropped += left
        routing = replace(base, counts=counts, dropped=max(0, dropped))
        return routing, over, rer, lost

    def _at_failed(self, tokens: int) -> tuple[LayerSample, FailureShares]:
        hit = self._memo.get(tokens)
        if hit is not None:
            return hit
        slots = max(1, tokens * self.system.scenario.model.top_k)
        times, drops, comms, overs, rers, losts = [], [], [], [], [], []
        from moesim.engine.moe_layer import critical_path

        for i in range(self.samples_for(tokens)):
            routing, over, rer, lost = self.route(tokens, i)
            rec = simulate_routed_layer(self.system, routing)
            path = critical_path(rec.timeline)
            extra = 0.0
            for d, f in self.slow:
                busy = sum(
                    iv.end_s - iv.start_s
                    for iv in rec.timeline.intervals
                    if iv.device == d and iv.lane == "compute"
                )
                extra = max(extra, (f - 1.0) * busy)
            times.append(rec.time_s + extra)
            comms.append(path["dispatch"] + path["combine"])
            drops.append(routing.dropped / slots)
            overs.append(over / slots)
            rers.append(rer / slots)
            losts.append(lost / slots)
        out = (
            LayerSample(float(np.mean(times)), float(np.mean(drops)), float(np.mean(comms))),
            FailureShares(float(np.mean(overs)), float(np.mean(rers)), float(np.mean(losts))),
        )
        self._memo[tokens] = out
        return out

    def sample(self, tokens: int) -> LayerSample:
        return self.sample_with_shares(tokens)[0]

    def sample_with_shares(self, tokens: int) -> tuple[LayerSample, FailureShares]:
        """Expected time, dropped fraction and failure shares over ``tokens`` tokens."""
        if tokens <= 0:
            return LayerSample(0.0, 0.0, 0.0), FailureShares()
        lo, hi = bucket_points(tokens)
        a, fa = self._at_failed(lo)
        if hi == lo:
            return a, fa
        b, fb = self._at_failed(hi)
        w = (tokens - lo) / (hi - lo)

        def mix(x: float, y: float) -> float:
            return x + w * (y - x)

        return (
            LayerSample(
                mix(a.time_s, b.time_s),
                mix(a.dropped_fraction, b.dropped_fraction),
                mix(a.comm_s, b.comm_s),
            ),
            FailureShares(
                mix(fa.failed_over, fb.failed_over),
                mix(fa.rerouted, fb.rerouted),
                mix(fa.lost, fb.lost),
            ),
        )


# --- serving ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingFailureRecords:
    """What failures did to a serving run."""

    plan: FailurePlan
    iteration_state: np.ndarray
    """Index into ``plan.states`` of each iteration (the state at its start)."""
    failed_over_fraction: np.ndarray
    """Per iteration: expected share of MoE slots sent to replicas."""
    rerouted_fraction: np.ndarray
    """Per iteration: expected share of MoE slots rerouted to a next choice."""
    lost_fraction: np.ndarray
    """Per iteration: expected share of MoE slots dropped because their expert was dead."""
    lost_requests: np.ndarray
    """Per request: lost with its failed rank (``on_rank_loss: lose``)."""
    requeued: int
    """Requests moved off failed ranks."""
    requeue_recomputed_tokens: int
    """Tokens whose KV was lost with a failed rank and computed again."""
    moe_layers: int
    top_k: int


class ServingFailures:
    """The serving engine's view of failures: state changes at iteration boundaries,
    rank liveness, and iteration costs per failure state."""

    def __init__(self, system: System, base: IterationCost, horizon_s: float) -> None:
        s = system.scenario
        assert s.failures is not None
        self.system = system
        self.cfg = s.failures
        self.plan = build_plan(system, horizon_s)
        self.base = base
        self.dp = s.parallelism.dp
        self.tp = s.parallelism.tp
        self.costs: dict[FailureState, IterationCost] = {}
        self.index = 0
        self.dead_dp: frozenset[int] = frozenset()
        self.pending: list[int] = []
        self.lost: set[int] = set()
        self.requeued = 0
        self.recomputed = 0
        self.rows: list[tuple[int, float, float, float]] = []
        self._rr = 0
        self.n_moe = len(s.model.moe_layer_indices)
        self.top_k = s.model.top_k

    def _dead_dp(self, state: FailureState) -> frozenset[int]:
        stage = self.dp * self.tp
        return frozenset((d % stage) // self.tp for d in state.dead)

    def rank_for(self, now: float) -> int | None:
        """A live rank for a new request (round-robin over the live ranks), None if none."""
        dead = self._dead_dp(self.plan.at(now))
        alive = [r for r in range(self.dp) if r not in dead]
        if not alive:
            return None
        self._rr += 1
        return alive[(self._rr - 1) % len(alive)]

    def advance(
        self, now: float, ranks: Sequence[RankScheduler], state: RequestState, rank_of: np.ndarray
    ) -> float:
        """Apply the state changes up to ``now``; the time to wait for a live rank (0 when
        one is live, inf when none will be)."""
        self.index = self.plan.index_at(now)
        st = self.plan.states[self.index]
        if st.stalled:  # a failure nobody noticed yet: every rank waits on it
            return self.plan.next_change(now) - now
        dead = self._dead_dp(st)
        for r in sorted(dead - self.dead_dp):
            sched = ranks[r]
            gone = sorted({*sched.running, *sched.waiting})
            sched.running.clear()
            sched.waiting.clear()
            for rid in gone:
                state.blocks[rid] = 0
                if self.cfg.recovery.on_rank_loss == "lose":
                    self.lost.add(rid)
                    continue
                state.recomputed[rid] += state.computed[rid]
                self.recomputed += state.computed[rid]
                state.computed[rid] = 0
                self.pending.append(rid)
                self.requeued += 1
            sched.free_blocks = sched.total_blocks
        self.dead_dp = dead
        alive = [r for r in range(self.dp) if r not in dead]
        if not alive:
            nxt = now
            while True:
                nxt = self.plan.next_change(nxt)
                if nxt == math.inf or len(self._dead_dp(self.plan.at(nxt))) < self.dp:
                    return nxt - now
        if self.pending:
            per: dict[int, list[int]] = {}
            for k, rid in enumerate(sorted(self.pending)):
                r = alive[k % len(alive)]
                per.setdefault(r, []).append(rid)
                rank_of[rid] = r
            for r, rids in per.items():
                ranks[r].waiting.extendleft(reversed(rids))
            self.pending.clear()
        return 0.0

    def hold(self, rid: int) -> None:
        """A request that arrived while no rank was live."""
        self.pending.append(rid)

    def _cost(self, state: FailureState) -> IterationCost:
        from moesim.cost.iteration import IterationCost

        if state.healthy:
            return self.base
        cost = self.costs.get(state)
        if cost is None:
            sys_ = degraded_system(self.system, state)
            moe = FailedMoECost(
                sys_,
                layer_run,
                dead=state.dead,
                mode=self.cfg.recovery.on_expert_loss,
                slow=state.slow,
            )
            cost = IterationCost(sys_, moe)
            self.costs[state] = cost
        return cost

    def time(
        self,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """The iteration's time in the current state (stragglers applied), logged."""
        from moesim.cost.iteration import IterationTime

        st = self.plan.states[self.index]
        cost = self._cost(st)
        it = cost.time(tokens, keys, kv_read_tokens, sampled)
        n = int(sum(tokens))
        moe = cost.moe_cost
        shares = moe.sample_with_shares(n)[1] if isinstance(moe, FailedMoECost) else FailureShares()
        if st.slow:
            busy = [r for r, t in enumerate(tokens) if t > 0]
            f = max(
                (st.slowdown(r * self.tp + x) for r in busy for x in range(self.tp)), default=1.0
            )
            parts = (it.attention_s * f, it.moe_s, it.dense_s * f, it.head_s * f)
            it = IterationTime(sum(parts), *parts, it.dropped_fraction, it.moe_comm_s)
        self.rows.append((self.index, shares.failed_over, shares.rerouted, shares.lost))
        return it

    def records(self, requests: int) -> ServingFailureRecords:
        cols = np.array(self.rows, dtype=float).reshape(-1, 4)
        lost = np.zeros(requests, dtype=bool)
        lost[sorted(self.lost)] = True
        return ServingFailureRecords(
            plan=self.plan,
            iteration_state=cols[:, 0].astype(np.int64),
            failed_over_fraction=cols[:, 1],
            rerouted_fraction=cols[:, 2],
            lost_fraction=cols[:, 3],
            lost_requests=lost,
            requeued=self.requeued,
            requeue_recomputed_tokens=self.recomputed,
            moe_layers=self.n_moe,
            top_k=self.top_k,
        )
