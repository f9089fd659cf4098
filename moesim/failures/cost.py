"""The MoE layer cost in a failure state: :class:`FailedMoECost`, the expected time,
dropped share, all-to-all time and link bytes of one MoE layer by batch size, with the
routing outcome changed for the experts of dead devices.

It wraps the healthy :class:`~moesim.cost.layer_cost.MoELayerCost` rather than extending
it: the healthy cost gives the sampling policy (how many routing samples a batch size
averages, and each sample's popularity), the layer simulator prices each failed-over
sample on the state's degraded system (:func:`moesim.failures.degraded.degraded_system`),
and the memo, keyed by bucket size like the healthy one, holds the failed-over samples
only, so every figure (link bytes included) is that of the degraded routing on the
degraded system. Per expert-data-parallel group, the slots of a dead device's experts go:

- ``replica``: to the replica (whose device then runs more tokens and one more expert, so
  the layer gets slower); a slot whose replica is also dead is dropped;
- ``reroute``: to the token's next live choice. With Gumbel-top-k sampling this is exactly
  "the next choice" (the same noise, the dead experts removed from the ranking), so the
  routing is redrawn from the same stream with the dead experts' popularity set to zero;
- ``drop``: to the residual.

The same routing streams as the healthy layer are used (common random numbers), so a
state's cost differs from the healthy one by the failure only.

**Stragglers** multiply the compute of their device: the straggler's own compute in the
simulated layer (gate, experts, combine: its busy time) grows by the factor, and the layer
by that growth, the worst straggler's; exact when the straggler is on the layer's critical
path (balanced load), which the lock-step of the ranks makes the usual case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from moesim import rng
from moesim.cost.layer_cost import LayerSample, bucket_points
from moesim.engine.layer_sim import LayerRecords, simulate_routed_layer
from moesim.engine.moe_layer import critical_path
from moesim.failures.degraded import FailedLayout, lost_ep_ranks
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System

RoutedLayerSimulator = Callable[[System, LayerRouting], LayerRecords]
"""Simulates one routed layer on a system, with its timeline (the stragglers' busy time)."""


class RoutingSamples(Protocol):
    """The sampling policy of a healthy MoE layer cost
    (:class:`moesim.cost.layer_cost.MoELayerCost` satisfies it)."""

    def samples_for(self, tokens: int) -> int:
        """Routing samples averaged for a bucket of ``tokens`` tokens."""
        ...

    def sample_popularity(self, i: int, n: int) -> np.ndarray:
        """The popularity of routing sample ``i`` of ``n``."""
        ...


@dataclass(frozen=True)
class FailureShares:
    """Shares of a layer's token-choice slots affected by a failure."""

    failed_over: float = 0.0
    """Sent to a replica."""
    rerouted: float = 0.0
    """Sent to the token's next live choice."""
    lost: float = 0.0
    """Dropped because their expert (and its replica) was dead."""


class FailedMoECost:
    """Expected MoE layer cost by batch size in one failure state (see the module
    docstring); the same methods as :class:`~moesim.cost.layer_cost.MoELayerCost`
    (``sample``, ``time_s``, ``link_bytes``, ``evaluations``, ``sim_events``,
    ``network_events``), plus :meth:`sample_with_shares` and :meth:`route`.

    ``system`` is the state's degraded system (its layout a :class:`FailedLayout`),
    ``healthy`` the healthy system's layer cost (for its sampling policy)."""

    def __init__(
        self,
        system: System,
        healthy: RoutingSamples,
        *,
        dead: frozenset[int] = frozenset(),
        mode: str = "drop",
        slow: tuple[tuple[int, float], ...] = (),
        simulate: RoutedLayerSimulator = simulate_routed_layer,
    ) -> None:
        lay = system.layout
        assert isinstance(lay, FailedLayout), "a failure cost needs degraded_system()'s system"
        self.system = system
        self.healthy = healthy
        self.simulate = simulate
        self.dead = dead
        self.mode = mode
        self.slow = slow
        """(device, slowdown) of the stragglers."""
        self.sim_events = 0
        """SimPy events of every layer simulated so far (for benchmarks)."""
        self.network_events = 0
        """Network re-ratings or batches of those simulations."""
        self._lay = lay
        self._lost = lost_ep_ranks(lay, dead)
        self._memo: dict[int, tuple[LayerSample, FailureShares]] = {}

    @property
    def evaluations(self) -> int:
        """Distinct bucket sizes simulated so far."""
        return len(self._memo)

    def samples_for(self, tokens: int) -> int:
        return self.healthy.samples_for(tokens)

    def sample_popularity(self, i: int, n: int) -> np.ndarray:
        return self.healthy.sample_popularity(i, n)

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

    def _at(self, tokens: int) -> tuple[LayerSample, FailureShares]:
        hit = self._memo.get(tokens)
        if hit is not None:
            return hit
        slots = max(1, tokens * self.system.scenario.model.top_k)
        times, drops, comms, links, overs, rers, losts = [], [], [], [], [], [], []
        for i in range(self.samples_for(tokens)):
            routing, over, rer, lost = self.route(tokens, i)
            rec = self.simulate(self.system, routing)
            self.sim_events += rec.sim_events
            self.network_events += rec.network_events
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
            links.append(rec.link_bytes)
            overs.append(over / slots)
            rers.append(rer / slots)
            losts.append(lost / slots)
        out = (
            LayerSample(
                float(np.mean(times)),
                float(np.mean(drops)),
                float(np.mean(comms)),
                np.mean(links, axis=0),
            ),
            FailureShares(float(np.mean(overs)), float(np.mean(rers)), float(np.mean(losts))),
        )
        self._memo[tokens] = out
        return out

    def sample(self, tokens: int) -> LayerSample:
        """Expected time, dropped fraction and all-to-all time over ``tokens`` tokens."""
        return self.sample_with_shares(tokens)[0]

    def time_s(self, tokens: int) -> float:
        return self.sample(tokens).time_s

    def sample_with_shares(self, tokens: int) -> tuple[LayerSample, FailureShares]:
        """Expected time, dropped fraction and failure shares over ``tokens`` tokens."""
        if tokens <= 0:
            return LayerSample(0.0, 0.0, 0.0), FailureShares()
        lo, hi = bucket_points(tokens)
        a, fa = self._at(lo)
        if hi == lo:
            return a, fa
        b, fb = self._at(hi)
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

    def link_bytes(self, tokens: int) -> np.ndarray:
        """Expected bytes per edge of the degraded system (``system.paths``: a down link's
        edges are gone) of one MoE layer over ``tokens`` tokens, from the failed-over
        routing (interpolated between buckets like the time)."""
        n = self.system.paths.bandwidth_gbps.shape[0]
        if tokens <= 0:
            return np.zeros(n)
        lo, hi = bucket_points(tokens)
        a = self._at(lo)[0].link_bytes
        a = np.zeros(n) if a is None else a
        if hi == lo:
            return a
        b = self._at(hi)[0].link_bytes
        b = np.zeros(n) if b is None else b
        w = (tokens - lo) / (hi - lo)
        return np.asarray(a + w * (b - a))
