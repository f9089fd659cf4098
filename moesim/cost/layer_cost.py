"""The expected cost of one MoE layer for a batch of N tokens, memoized for workloads that
run many layers (serving iterations, training micro-batches).

It routes a few samples (:func:`moesim.routing.route.route_layer`) and prices each with a
``LayerSimulator``, the same per-layer path as the ``layer`` workload (dispatch -> experts ->
combine on the cluster: :func:`moesim.engine.layer_sim.layer_run`, given by the engine,
which sits above this package), and averages them, so a change to how an MoE layer is
costed reaches every workload. Batch sizes are bucketed (exact up to 64 tokens, then
geometric steps of 1/8) and interpolated linearly between buckets, so a long run evaluates
each bucket once.

Very large batches need fewer samples: their layer time varies little from one routing
sample to the next (GLaM, 262,144 tokens over 512 TPU v4 chips: 1.3% between the extremes
of three samples), so a bucket averages at most ``ceil(SAMPLE_TOKENS / tokens)`` samples,
never fewer than one; up to 43,690 tokens that is all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moesim import rng
from moesim.cost.cost_store import LayerCostStore, StoredBucket, layer_key
from moesim.derived.expert_replicas import route_replicated
from moesim.routing.distributions import layer_popularities
from moesim.routing.replay import replayed, window_choices
from moesim.routing.route import LayerRouting, route_layer
from moesim.system import System

EXACT_UP_TO = 64
STEP = 1.125
SAMPLE_TOKENS = 131_072
"""Routing samples per bucket are capped at ceil(SAMPLE_TOKENS / tokens)."""
SAMPLE_REL_SE = 0.002
"""A bucket stops drawing routing samples once the standard error of its mean time,
estimated from the samples so far (at least two), is within this fraction of the mean.
Measured on the Mixtral serving hour (``benchmarks/serving_mixtral.py``): the three
samples of a bucket spread by 0.065% (median relative standard deviation; 1.6% at most,
for a handful of tokens), so most buckets need two; a bucket's mean moved by at most 0.94%."""


@dataclass(frozen=True)
class LayerSample:
    """Averages over the routing samples of one bucket."""

    time_s: float
    dropped_fraction: float
    comm_s: float
    """The all-to-all part of the layer's critical path (dispatch + combine)."""
    link_bytes: np.ndarray | None = field(default=None, compare=False)
    """Bytes each topology edge carried (mean over the samples), for network energy."""


@dataclass(frozen=True)
class LayerRun:
    """One routed layer priced on the cluster: what a ``LayerSimulator`` returns."""

    time_s: float
    comm_s: float
    """The all-to-all part of the layer's critical path (dispatch + combine)."""
    link_bytes: np.ndarray
    """Bytes each topology edge carried."""
    sim_events: int = 0
    network_events: int = 0


LayerSimulator = Callable[[System, LayerRouting], LayerRun]
"""Prices one routed layer on a system (the engine's flow-level layer simulation)."""


class LayerCostModel(Protocol):
    """What workloads ask of an MoE layer's cost: the interface an engine preset, a padded
    expert kernel, a routing trace or a failure state plugs into (``MoELayerCost`` is the
    simulated one; ``moesim.failures.cost.FailedMoECost`` wraps it for a failure state)."""

    def sample(self, tokens: int) -> LayerSample:
        """Expected time, dropped fraction and all-to-all share of one layer of ``tokens``."""
        ...

    def time_s(self, tokens: int) -> float:
        """Expected time of one layer of ``tokens`` tokens."""
        ...

    def link_bytes(self, tokens: int) -> np.ndarray:
        """Expected bytes per topology edge of one layer of ``tokens`` tokens."""
        ...

    @property
    def evaluations(self) -> int:
        """Distinct batch sizes priced so far."""
        ...


def _settled(times: list[float]) -> bool:
    """Whether the mean of ``times`` is known well enough (:data:`SAMPLE_REL_SE`)."""
    mean = float(np.mean(times))
    se = float(np.std(times, ddof=1)) / math.sqrt(len(times))
    return mean > 0 and se <= SAMPLE_REL_SE * mean


def bucket_points(tokens: int) -> tuple[int, int]:
    """The two bucket sizes around ``tokens`` (equal when it is a bucket itself)."""
    if tokens <= EXACT_UP_TO:
        return tokens, tokens
    k = math.log(tokens / EXACT_UP_TO, STEP)
    lo = round(EXACT_UP_TO * STEP ** math.floor(k))
    hi = round(EXACT_UP_TO * STEP ** math.ceil(k))
    return min(lo, tokens), (max(hi, tokens) if lo != hi else tokens)


@dataclass
class MoELayerCost:
    """Memoized expected time and drop rate of one MoE layer by batch size."""

    system: System
    simulate: LayerSimulator
    """How one routed sample is priced (``moesim.engine.layer_sim.layer_run``)."""
    samples: int = 3
    _cache: dict[int, LayerSample] = field(default_factory=dict)
    sim_events: int = 0
    """SimPy events of every layer simulated so far (for benchmarks)."""
    network_events: int = 0
    """Network re-ratings (flow by flow) or batches (bulk) of those simulations."""
    _used: set[int] = field(default_factory=set)
    store: LayerCostStore | None = None
    """Where priced buckets are also kept for other processes and runs (None: memory only;
    :mod:`moesim.cost.cost_store`)."""
    pinned: dict[int, LayerSample] = field(default_factory=dict)
    """Samples fixed for given batch sizes: a training run whose routing is consumed in
    order prices its micro-batches from their own tokens (:mod:`moesim.cost.routed_layers`)."""

    def sharing(self, system: System) -> MoELayerCost:
        """A cost for another run of the same layer (same cluster, model, layout, routing,
        policies and seed) that reuses this one's priced buckets; its ``evaluations`` count
        the buckets that run asks for, as if it had priced them itself."""
        return MoELayerCost(system, self.simulate, self.samples, self._cache, store=self.store)

    def __post_init__(self) -> None:
        s = self.system.scenario
        self._pops = layer_popularities(
            s.routing,
            s.model.experts,
            len(s.model.moe_layer_indices),
            rng.stream(s.seed, "popularity"),
        )
        self._popularity = self._pops[0]
        self._per_layer = s.routing.layers == "independent" and len(self._pops) > 1
        self._replayed = replayed(s.routing)
        self._store_key = layer_key(s, self.samples) if self.store is not None else ""

    def samples_for(self, tokens: int) -> int:
        """Routing samples averaged for a bucket of ``tokens`` tokens (more when the layers
        route differently: they are spread over the layers)."""
        wanted = max(self.samples, min(8, len(self._pops))) if self._per_layer else self.samples
        return max(1, min(wanted, math.ceil(SAMPLE_TOKENS / max(1, tokens))))

    def sample_popularity(self, i: int, n: int) -> np.ndarray:
        """The popularity of routing sample ``i`` of ``n``: one layer's, the samples spread
        evenly over the MoE layers (all alike unless ``routing.layers`` is independent)."""
        return self._pops[(i * len(self._pops)) // max(1, n)]

    @property
    def evaluations(self) -> int:
        """Distinct bucket sizes priced so far for this cost's runs (a shared bucket that
        another run priced counts too: the figure does not depend on sharing)."""
        return len(self._used)

    def _at(self, tokens: int) -> LayerSample:
        self._used.add(tokens)
        if tokens not in self._cache and self.store is not None:
            kept = self.store.get(self._store_key, tokens)
            if kept is not None:
                self._cache[tokens] = LayerSample(
                    kept.time_s, kept.dropped_fraction, kept.comm_s, kept.link_bytes
                )
        if tokens not in self._cache:
            s = self.system.scenario
            times: list[float] = []
            drops, comms, links = [], [], []
            n = self.samples_for(tokens)
            # samples that stand for distinct layers or trace windows are all kept
            early_stop = n > 2 and not self._per_layer and not self._replayed
            for i in range(n):
                if early_stop and i >= 2 and _settled(times):
                    break
                gen = rng.stream(s.seed, "layer-cost", tokens, i)
                choices = None
                if self._replayed:  # a trace's tokens [i N, (i+1) N), or logits draws
                    depth = s.model.experts if s.policies.overflow == "reroute" else s.model.top_k
                    choices = window_choices(s, tokens, i, n, depth, gen)
                args = (self.system.layout, tokens, s.model, s.policies, self.system.expert_node)
                pop = self.sample_popularity(i, n)
                placement = self.system.placement
                if placement is None:
                    routing = route_layer(gen, pop, *args, choices)
                else:  # redundant experts: the choices go to the layer's replicas
                    layer = (i * len(self._pops)) // max(1, n)
                    routing = route_replicated(gen, placement, layer, pop, *args, choices)
                rec = self.simulate(self.system, routing)
                self.sim_events += rec.sim_events
                self.network_events += rec.network_events
                times.append(rec.time_s)
                comms.append(rec.comm_s)
                drops.append(routing.dropped / max(1, tokens * s.model.top_k))
                links.append(rec.link_bytes)
            self._cache[tokens] = LayerSample(
                float(np.mean(times)),
                float(np.mean(drops)),
                float(np.mean(comms)),
                np.mean(links, axis=0),
            )
            if self.store is not None:
                c = self._cache[tokens]
                bucket = StoredBucket(c.time_s, c.dropped_fraction, c.comm_s, c.link_bytes)
                self.store.put(self._store_key, tokens, bucket)
        return self._cache[tokens]

    def sample(self, tokens: int) -> LayerSample:
        """Expected time and dropped fraction of one MoE layer over ``tokens`` tokens."""
        if tokens <= 0:
            return LayerSample(0.0, 0.0, 0.0)
        if tokens in self.pinned:
            return self.pinned[tokens]
        lo, hi = bucket_points(tokens)
        a = self._at(lo)
        if hi == lo:
            return a
        b = self._at(hi)
        w = (tokens - lo) / (hi - lo)
        return LayerSample(
            a.time_s + w * (b.time_s - a.time_s),
            a.dropped_fraction + w * (b.dropped_fraction - a.dropped_fraction),
            a.comm_s + w * (b.comm_s - a.comm_s),
        )

    def time_s(self, tokens: int) -> float:
        return self.sample(tokens).time_s

    def link_bytes(self, tokens: int) -> np.ndarray:
        """Expected bytes per topology edge of one MoE layer over ``tokens`` tokens
        (interpolated between buckets like the time)."""
        n = self.system.paths.bandwidth_gbps.shape[0]
        if tokens <= 0:
            return np.zeros(n)
        lo, hi = bucket_points(tokens)
        a = self._at(lo).link_bytes
        a = np.zeros(n) if a is None else a
        if hi == lo:
            return a
        b = self._at(hi).link_bytes
        b = np.zeros(n) if b is None else b
        w = (tokens - lo) / (hi - lo)
        return np.asarray(a + w * (b - a))
