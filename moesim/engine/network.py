"""The network back-ends as SimPy components (the API is :mod:`moesim.engine.netapi`).

A transfer is a flow of bytes along a path; its delivery event fires after its last byte
has left plus the path's latency. Two back-ends, chosen when the network is built:

- :class:`FlowNetwork`, flow by flow: whenever a flow starts or ends, the rates of all
  active flows are recomputed (:func:`moesim.cost.fairshare.max_min_rates`); the next event
  is the earliest completion. One event per flow start/end, never per byte or token.
- :class:`BatchedFlowNetwork`, for exchanges too large to simulate flow by flow: the flows
  started at one simulated instant form one batch priced analytically from the links'
  loads (:mod:`moesim.cost.fluid`), and each delivery event fires at its priced arrival
  (relayed all-to-alls forward on them).

Both price a batch given as arrays (:meth:`transfer_bulk`, :meth:`transfer_routed`: no
event per flow, one vectorized pass per batch; later batches queue behind the links'
backlog). In a :class:`FlowNetwork` these batches and the per-flow transfers keep separate
state and do not see each other, so one simulation uses one or the other for a given
exchange (the MoE layer picks by the exchange's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.cost.fairshare import max_min_rates_coo
from moesim.cost.fluid import batch_finish_s
from moesim.topology.paths import PathTable
from moesim.units import GB

EXACT_FLOWS = 256
"""Up to this many flows in flight, every completion re-rates the others exactly."""
DIRECT_LINKS = 1024
"""Topologies with up to this many directed edges rate flows over every edge (unused ones
are skipped by the rating); larger ones over the edges in use only."""
BATCH_WINDOW = 0.01
"""Above it, completions due within this fraction of the network's elapsed time (since it
was built, i.e. since its layer started) are batched."""


@dataclass
class _BatchPricing:
    """Link counters and the analytic pricing of batches of flows, common to both
    back-ends."""

    env: simpy.Environment
    paths: PathTable
    link_bytes: np.ndarray = field(init=False)
    """Bytes carried by each directed edge so far."""
    events: int = 0
    """Rate recomputations or batch pricings performed (for benchmarks)."""
    sent_bytes: float = 0.0
    """Bytes of every flow injected between distinct devices (each hop of a relay counts)."""

    def __post_init__(self) -> None:
        self.capacity = self.paths.bandwidth_gbps * GB
        self.link_bytes = np.zeros(len(self.capacity))
        self._free_s = np.zeros(len(self.capacity))

    def _delivery_events(
        self, flows: Sequence[tuple[int, int, float]]
    ) -> tuple[list[simpy.Event], list[tuple[int, int, float, simpy.Event]]]:
        """One delivery event per flow; local copies and empty flows are delivered now, the
        others are returned with their events to be priced."""
        out: list[simpy.Event] = []
        remote: list[tuple[int, int, float, simpy.Event]] = []
        for src, dst, nbytes in flows:
            ev = self.env.event()
            out.append(ev)
            if src == dst or nbytes <= 0:
                ev.succeed()
            else:
                remote.append((src, dst, float(nbytes), ev))
        return out, remote

    def transfer_bulk(
        self,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_s: float = 0.0,
    ) -> np.ndarray:
        """Flows ``(src[i], dst[i], nbytes[i])`` starting now, priced as one batch.

        Returns each flow's absolute delivery time: when its busiest link is done with it
        (fair sharing within the batch, after the links' backlog from earlier batches;
        see :func:`moesim.cost.fluid.batch_finish_s`) plus its route's latency and
        ``extra_latency_s``. Local copies (``src == dst``) and empty flows arrive now.
        Counts one network event per call and adds the bytes to ``link_bytes``.
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        flow, edge, latency = self.paths.edge_pairs(src, dst)
        return self.transfer_routed(flow, edge, latency, np.asarray(nbytes, float), extra_latency_s)

    def transfer_routed(
        self,
        flow: np.ndarray,
        edge: np.ndarray,
        latency_s: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_s: float = 0.0,
    ) -> np.ndarray:
        """:meth:`transfer_bulk` with the routes already looked up: ``(flow, edge)`` pairs
        (:meth:`moesim.topology.paths.PathTable.edge_pairs`) and each flow's route latency.
        A flow with no hops is a local copy and arrives now."""
        now = float(self.env.now)
        arrive = np.full(len(nbytes), now)
        hops = np.bincount(flow, minlength=len(nbytes))
        remote = (hops > 0) & (nbytes > 0)
        if not remote.any():
            return arrive
        if not remote.all():
            keep = remote[flow]
            flow, edge = flow[keep], edge[keep]
        sizes = np.where(remote, nbytes, 0.0)
        self.events += 1
        times = batch_finish_s(now, flow, edge, sizes, self.capacity, self._free_s, inplace=True)
        self._free_s = times.link_free_s
        self.link_bytes += np.bincount(edge, weights=sizes[flow], minlength=len(self.link_bytes))
        self.sent_bytes += float(sizes.sum())
        arrive[remote] = times.done_s[remote] + latency_s[remote] + extra_latency_s
        return arrive


@dataclass
class FlowNetwork(_BatchPricing):
    """Bytes in flight over a topology, flow by flow, with max-min fair link sharing.

    Active flows are kept as parallel arrays (remaining bytes, size, latency) plus their
    paths and delivery events, so advancing time and finding finished flows are vector
    operations.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        # the routes of the flows in flight as incidence pairs: hop i of the flows is
        # edge _pair_edge[i] of flow _pair_flow[i] (flows in order, each one's hops in order)
        self._pair_flow = np.zeros(0, dtype=np.int64)
        self._pair_edge = np.zeros(0, dtype=np.int64)
        self._done: list[simpy.Event] = []
        self._remaining = np.zeros(0)
        self._size = np.zeros(0)
        self._latency = np.zeros(0)
        self._rates = np.zeros(0)
        self._epoch = float(self.env.now)
        self._last = self._epoch
        self._version = 0

    @property
    def active(self) -> int:
        """Flows in flight."""
        return len(self._done)

    def transfer_many(
        self, flows: Sequence[tuple[int, int, float]], extra_latency_s: float = 0.0
    ) -> list[simpy.Event]:
        """Start flows ``(src device, dst device, bytes)`` now; one delivery event each.

        ``extra_latency_s`` is a fixed cost added to every flow's delivery (a collective's
        launch and synchronisation, as measured)."""
        out, remote = self._delivery_events(flows)
        self._advance()
        sizes, latencies, routes = [], [], []
        for src, dst, nbytes, ev in remote:
            path = self.paths.edge_ids(src, dst)
            self.link_bytes[path] += nbytes
            self.sent_bytes += nbytes
            routes.append(path)
            self._done.append(ev)
            sizes.append(nbytes)
            latencies.append(self.paths.latency_s(src, dst) + extra_latency_s)
        if sizes:
            first = len(self._remaining)
            hops = [len(r) for r in routes]
            self._pair_edge = np.concatenate([self._pair_edge, *routes])
            self._pair_flow = np.concatenate(
                [self._pair_flow, np.repeat(np.arange(first, first + len(routes)), hops)]
            )
            self._remaining = np.concatenate([self._remaining, sizes])
            self._size = np.concatenate([self._size, sizes])
            self._latency = np.concatenate([self._latency, latencies])
            self._reschedule()
        return out

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and self._done:
            self._remaining -= self._rates * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        self._version += 1
        if not self._done:
            return
        self.events += 1
        if len(self.capacity) <= DIRECT_LINKS:  # rows are the edge ids themselves
            rows, capacity = self._pair_edge, self.capacity
        else:  # only the links in use get a row
            links, rows = np.unique(self._pair_edge, return_inverse=True)
            capacity = self.capacity[links]
        self._rates = max_min_rates_coo(rows, self._pair_flow, len(self._done), capacity)
        wait = float(np.min(np.maximum(self._remaining, 0.0) / self._rates))
        version = self._version

        def wake(_: simpy.Event) -> None:
            if version == self._version:  # else a newer flow changed the rates
                self._wake()

        self.env.timeout(wait).callbacks.append(wake)

    def _wake(self) -> None:
        """The earliest completion is due: deliver what has finished, re-rate the rest."""
        self._advance()
        # Flows due within a hair of now finish together (equal sizes, same rate). With
        # many flows in flight, those due within a small window of the earliest also
        # finish in this round, each at its own time at its current rate: the rates are
        # then recomputed once per window instead of once per flow, an error bounded by
        # the window on those flows' last stretch. The window is a fraction of the time
        # the network has carried traffic for its simulation (since it was built: one
        # network per layer), never of the absolute clock, so a layer priced an hour into
        # a run takes what it takes at t = 0.
        left = np.maximum(self._remaining, 0.0) / self._rates
        window = BATCH_WINDOW if len(self._done) > EXACT_FLOWS else 0.0
        horizon = (self.env.now - self._epoch) * window
        finished = (self._remaining <= 1e-9 * self._size + 1e-6) | (left <= 1e-12 + horizon)
        for i in np.flatnonzero(finished):
            self._deliver(self._done[i], float(self._latency[i] + left[i]))
        keep = ~finished
        kept_pair = keep[self._pair_flow]
        renumber = np.cumsum(keep) - 1
        self._pair_flow = renumber[self._pair_flow[kept_pair]]
        self._pair_edge = self._pair_edge[kept_pair]
        self._done = [e for e, k in zip(self._done, keep) if k]
        self._remaining = self._remaining[keep]
        self._size = self._size[keep]
        self._latency = self._latency[keep]
        self._reschedule()

    def _deliver(self, done: simpy.Event, latency_s: float) -> None:
        if latency_s <= 0:
            done.succeed()
            return

        def fire(_: simpy.Event) -> None:
            done.succeed()

        self.env.timeout(latency_s).callbacks.append(fire)


@dataclass
class BatchedFlowNetwork(_BatchPricing):
    """Bytes in flight priced in per-instant batches, with a delivery event per flow.

    The flows :meth:`transfer_many` starts at one simulated instant form one
    :meth:`transfer_bulk` batch, and each delivery event fires at its priced arrival (one
    timeout per distinct arrival time, no re-rating). Used for large relayed all-to-alls
    (hierarchical), whose forwarding needs per-flow events; within 2% of
    :class:`FlowNetwork` on DeepSeek-V3 EP 32 (``tests/test_fluid.py``).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: list[tuple[int, int, float, float, simpy.Event]] = []

    def transfer_many(
        self, flows: Sequence[tuple[int, int, float]], extra_latency_s: float = 0.0
    ) -> list[simpy.Event]:
        """Start flows ``(src device, dst device, bytes)`` now, priced with every other flow
        started at this instant; one delivery event each."""
        out, remote = self._delivery_events(flows)
        if remote and not self._pending:
            self.env.timeout(0).callbacks.append(self._flush_batch)
        self._pending += [(s, d, b, extra_latency_s, ev) for s, d, b, ev in remote]
        return out

    def _flush_batch(self, _: simpy.Event) -> None:
        batch, self._pending = self._pending, []
        src = np.array([f[0] for f in batch], dtype=np.int64)
        dst = np.array([f[1] for f in batch], dtype=np.int64)
        nbytes = np.array([f[2] for f in batch])
        extra = np.array([f[3] for f in batch])
        arrive = self.transfer_bulk(src, dst, nbytes) + extra
        order = np.argsort(arrive, kind="stable")
        times = arrive[order]
        starts = np.flatnonzero(np.concatenate([[True], times[1:] != times[:-1]]))
        ends = np.concatenate([starts[1:], [len(times)]])
        now = float(self.env.now)
        for a, b in zip(starts.tolist(), ends.tolist()):
            events = [batch[int(i)][4] for i in order[a:b]]

            def fire(_: simpy.Event, events: list[simpy.Event] = events) -> None:
                for ev in events:
                    ev.succeed()

            self.env.timeout(max(float(times[a]) - now, 0.0)).callbacks.append(fire)
