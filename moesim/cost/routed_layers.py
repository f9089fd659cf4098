"""MoE layer costs of routing consumed in order (a replayed trace, a logits model): every
serving iteration and every training micro-batch priced from the tokens it takes.

The memoized expected cost (:class:`moesim.cost.layer_cost.MoELayerCost`) prices a batch
size ``N`` once, from fixed windows of the routing. Here each batch's own tokens are routed
layer by layer, exactly (capacity and overflow as configured; dropless in one ``bincount``
over every layer), so the per-expert counts that price a run are the routing's counts over
the tokens it consumed. The time of each routed layer is, in closed form,

``T(R) = T_bucket(N) + X(R) - X_bucket(N)``

where ``T_bucket`` is the memoized expected layer time, ``X(R)`` the expert step of the
layer's busiest expert device under the batch's routing ``R`` (the same
:meth:`moesim.cost.compute.Roofline.grouped_ffn_s` call the layer simulation makes,
memoized by the device's loads), and ``X_bucket`` the mean of ``X`` over the routing
samples behind ``T_bucket`` (interpolated between buckets alike). What the batch's routing
changes in the expert compute is priced; its all-to-all is the bucket's mean.

Error bound: with one expert device per layer (``dp x tp = 1``, no expert parallelism:
the offloaded decode) nothing else in the simulated layer depends on the routing (gate,
gather and scatter depend on ``N`` and the kept slots only, which dropless routing fixes),
so ``T(R)`` is the layer simulation's time exactly. With expert parallelism the all-to-all
also depends on ``R`` (per-destination bytes) and the busiest device's expert step may not
be on the critical path; :meth:`RoutedLayerCost.exact` simulates every routed layer
instead, to measure the difference (``tests/test_routing_trace.py``; docs/routing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import rng
from moesim.cost.layer_cost import LayerSample, MoELayerCost, bucket_points
from moesim.cost.padded import PaddedExperts
from moesim.derived.expert_replicas import route_replicated
from moesim.routing.distributions import layer_popularities
from moesim.routing.replay import (
    RoutingFeed,
    RoutingUse,
    recorded_choices,
    routing_feed,
    window_choices,
)
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System


@dataclass
class RoutedTotals:
    """What the routed layers priced so far."""

    counts: np.ndarray
    """int64 [moe_layers, model experts]: kept token slots priced, per layer and expert
    (logical experts; with redundant replicas summed over each expert's slots)."""
    layers: int = 0
    """Routed layers priced."""


class RoutedLayerCost:
    """Per-batch MoE layer samples from the batch's own routed tokens (module docstring)."""

    def __init__(self, system: System, cost: MoELayerCost) -> None:
        self.system, self.cost = system, cost
        s = system.scenario
        m = s.model
        self.model = m
        self.layout = system.layout
        self.layers = len(m.moe_layer_indices)
        self.pops = layer_popularities(
            s.routing, m.experts, self.layers, rng.stream(s.seed, "popularity")
        )
        self.depth = m.experts if s.policies.overflow == "reroute" else m.top_k
        self.fast = s.policies.overflow == "dropless" and system.placement is None
        self.padded = PaddedExperts.of(s.policies, m) is not None
        self.gen = rng.stream(s.seed, "routed-layers")
        self.totals = RoutedTotals(np.zeros((self.layers, m.experts), dtype=np.int64))
        self._x: dict[tuple[bytes, int, int], float] = {}
        self._x_bucket: dict[int, float] = {}
        self._exact: dict[tuple[int, bytes, bytes], float] = {}
        if system.placement is not None:
            self._slot_expert = system.placement.phy2log
        lc = system.layer_costs
        self._kernel = lc.expert_kernel
        self._rf = lc.roofline
        self._local = self.layout.ep * self.layout.etp == 1
        self._experts_of = [self.layout.local_experts(q) for q in range(self.layout.ep)]
        self._per_rank: dict[int, np.ndarray] = {}

    def tokens_per_rank(self, tokens: int) -> np.ndarray:
        """The layout's split of a batch over the stage's ranks (memoized)."""
        got = self._per_rank.get(tokens)
        if got is None:
            got = self._per_rank[tokens] = self.layout.tokens_per_rank(tokens)
        return got

    # --- routing ------------------------------------------------------------------------
    def route(self, x: np.ndarray) -> list[LayerRouting] | np.ndarray:
        """The batch's routing at every MoE layer: dropless, the kept slots per (layer,
        rank, expert) as one array; otherwise each layer routed by
        :func:`moesim.routing.route.route_layer` (capacity, overflow, replicas)."""
        n = len(x)
        per_rank = self.tokens_per_rank(n)
        if self.fast:
            ranks, e = len(per_rank), self.model.experts
            rank = np.repeat(np.arange(ranks), per_rank)
            idx = (np.arange(self.layers)[None, :, None] * ranks + rank[:, None, None]) * e + x
            return np.bincount(idx.ravel(), minlength=self.layers * ranks * e).reshape(
                self.layers, ranks, e
            )
        s = self.system.scenario
        out = []
        for j in range(self.layers):
            choices = recorded_choices(x[:, j, :], self.pops[j], self.depth)
            args = (self.layout, n, self.model, s.policies, self.system.expert_node)
            if self.system.placement is None:
                out.append(route_layer(self.gen, self.pops[j], *args, choices))
            else:
                out.append(
                    route_replicated(
                        self.gen, self.system.placement, j, self.pops[j], *args, choices
                    )
                )
        return out

    def _logical(self, counts: np.ndarray, layer: int) -> np.ndarray:
        """Per-expert kept slots of one layer's (ranks x slots) counts."""
        total = counts.sum(axis=0)
        if self.system.placement is None:
            return total
        phy = self._slot_expert[layer % self._slot_expert.shape[0]]
        return np.bincount(phy, weights=total, minlength=self.model.experts).astype(np.int64)

    # --- the closed form ----------------------------------------------------------------
    def expert_step_s(self, counts: np.ndarray, tokens_per_rank: np.ndarray) -> float:
        """X: the expert step of the busiest expert device for a layer's (ranks x slots)
        kept counts, as the layer simulation prices it (0 with padded experts, whose
        loads are their fixed capacity)."""
        if self.padded:
            return 0.0
        lay, m = self.layout, self.model
        d_ff = m.expert_d_ff // lay.etp
        worst = 0.0
        if self._local:
            groups = counts
        else:
            groups = counts.reshape(lay.edp, lay.ep * lay.etp, counts.shape[1]).sum(axis=1)
        for g in range(groups.shape[0]):
            for q in range(lay.ep):
                loads = groups[g] if self._local else groups[g, self._experts_of[q]]
                tok = int(tokens_per_rank[g]) if self._local else 0
                slots = int(loads.sum()) if self._local else 0
                key = (loads.tobytes(), tok, slots)
                t = self._x.get(key)
                if t is None:
                    t = self._x[key] = self._rf.grouped_ffn_s(
                        loads,
                        m.d_model,
                        d_ff,
                        m.activation,
                        self._kernel,
                        model=m,
                        tokens=tok,
                        slots=slots,
                    )
                worst = max(worst, t)
        return worst

    def _bucket_x(self, tokens: int) -> float:
        """X averaged over the routing samples of the bucket of ``tokens`` (the same
        deterministic windows :class:`MoELayerCost` simulates)."""
        got = self._x_bucket.get(tokens)
        if got is not None:
            return got
        s = self.system.scenario
        n = self.cost.samples_for(tokens)
        xs = []
        per_rank = self.layout.tokens_per_rank(tokens)
        for i in range(n):
            gen = rng.stream(s.seed, "layer-cost", tokens, i)
            choices = window_choices(s, tokens, i, n, self.depth, gen)
            pop = self.cost.sample_popularity(i, n)
            args = (self.layout, tokens, s.model, s.policies, self.system.expert_node)
            if self.system.placement is None:
                r = route_layer(gen, pop, *args, choices)
            else:
                layer = (i * len(self.pops)) // max(1, n)
                r = route_replicated(gen, self.system.placement, layer, pop, *args, choices)
            xs.append(self.expert_step_s(r.counts, per_rank))
        self._x_bucket[tokens] = float(np.mean(xs))
        return self._x_bucket[tokens]

    def expected_x(self, tokens: int) -> float:
        """X_bucket(N), interpolated between buckets as the layer cost is."""
        lo, hi = bucket_points(tokens)
        a = self._bucket_x(lo)
        if hi == lo:
            return a
        w = (tokens - lo) / (hi - lo)
        return a + w * (self._bucket_x(hi) - a)

    def price(self, x: np.ndarray) -> LayerSample:
        """The per-layer mean sample of a batch whose tokens chose ``x`` ([tokens,
        moe_layers, top_k]); counts what it priced into :attr:`totals`."""
        n = len(x)
        if n == 0:
            return LayerSample(0.0, 0.0, 0.0)
        base = self.cost.sample(n)
        per_rank = self.tokens_per_rank(n)
        routed = self.route(x)
        step = dropped = 0.0
        for j in range(self.layers):
            if isinstance(routed, np.ndarray):
                counts = routed[j]
            else:
                counts = routed[j].counts
                dropped += routed[j].dropped
            step += self.expert_step_s(counts, per_rank)
            self.totals.counts[j] += self._logical(counts, j)
        self.totals.layers += self.layers
        delta = step / self.layers - self.expected_x(n)
        slots = max(1, n * self.model.top_k * self.layers)
        return LayerSample(max(0.0, base.time_s + delta), dropped / slots, base.comm_s)

    def exact(self, x: np.ndarray) -> float:
        """The per-layer mean time of the batch with every routed layer simulated (the
        reference the closed form is measured against; memoized by routing outcome)."""
        n = len(x)
        per_rank = self.tokens_per_rank(n)
        routed = self.route(x)
        total = 0.0
        for j in range(self.layers):
            if isinstance(routed, np.ndarray):
                r = LayerRouting(per_rank, routed[j], 0, 0, 0, None, None)
                if self.system.expert_node is not None:  # node tokens need the choices
                    r = self.route_exact(x, j)
            else:
                r = routed[j]
            nodes = b"" if r.node_tokens is None else r.node_tokens.tobytes()
            key = (n, r.counts.tobytes(), nodes)
            t = self._exact.get(key)
            if t is None:
                t = self._exact[key] = self.cost.simulate(self.system, r).time_s
            total += t
        return total / self.layers

    def route_exact(self, x: np.ndarray, layer: int) -> LayerRouting:
        """One layer routed by :func:`route_layer` (with node tokens)."""
        s = self.system.scenario
        choices = recorded_choices(x[:, layer, :], self.pops[layer], self.depth)
        args = (self.layout, len(x), self.model, s.policies, self.system.expert_node)
        return route_layer(self.gen, self.pops[layer], *args, choices)


def routed_layer_cost(
    system: System, cost: object, feed: RoutingFeed | None
) -> RoutedLayerCost | None:
    """The per-batch pricing of a run whose routing is consumed in order (``feed``), its
    priced counts kept in the feed's :class:`moesim.routing.replay.RoutingUse`; None for
    popularity-sampled routing (or a layer cost that is not the simulated one)."""
    if feed is None or not isinstance(cost, MoELayerCost):
        return None
    routed = RoutedLayerCost(system, cost)
    feed.use.priced = routed.totals.counts
    return routed


def routed_training(
    system: System, cost: MoELayerCost, batch: int, batches: int
) -> RoutingUse | None:
    """A training run's micro-batches (``batches`` of ``batch`` tokens, every step's, in
    order) each priced from its own tokens; their mean per-layer sample is pinned in
    ``cost`` at ``batch`` tokens, so every MoE block of the simulated step costs the run's
    mean (the step's pipeline sees no per-micro-batch differences). None for
    popularity-sampled routing."""
    feed = routing_feed(system.scenario)
    routed = routed_layer_cost(system, cost, feed)
    if feed is None or routed is None:
        return None
    time = drop = comm = 0.0
    for _ in range(batches):
        sample = routed.price(feed.take(batch))
        time += sample.time_s
        drop += sample.dropped_fraction
        comm += sample.comm_s
    n = max(1, batches)
    cost.pinned[batch] = LayerSample(time / n, drop / n, comm / n)
    return feed.use
