"""A direct all-to-all phase priced in batches: one event per receiving device, not per flow.

The flow-by-flow exchange (:class:`moesim.engine.exchange.Exchange`) costs an event and a
max-min re-rating per flow completion, which is what makes an expert-parallel all-to-all
over hundreds of chips (tens of thousands of concurrent flows) take minutes. This exchange
keeps the same protocol (a source sends all its messages when it calls :meth:`send`; a
receiver waits for all its messages) but prices the messages analytically:

- the sources that send at the same simulated instant form one batch (an all-to-all's
  sources usually start together, right after their gates), priced in one vectorized pass
  of :meth:`moesim.engine.netapi.Network.transfer_routed` (per-link fair sharing,
  :mod:`moesim.cost.fluid`); later batches queue behind the links' backlog;
- each receiver gets one event, at the arrival of its last message.

Only the ``direct`` algorithm is modelled this way (DeepEP's: :mod:`moesim.engine.deepep`);
relayed (hierarchical) exchanges keep their per-flow delivery events (a relay forwards
once its contributions are in) but, above the same size, run on a network built to price
their flows in per-instant batches (:class:`moesim.engine.network.BatchedFlowNetwork`).
The MoE layer switches to this exchange above a message count
(:attr:`moesim.cost.layer_inputs.LayerCosts.bulk_a2a_min_flows`); ``tests/test_fluid.py``
compares the two where both run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simpy

from moesim.engine.netapi import Network
from moesim.topology.paths import ranges


class BulkExchange:
    """The messages of one direct all-to-all phase, as arrays, with one event per receiver."""

    def __init__(
        self,
        env: simpy.Environment,
        net: Network,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_s: float = 0.0,
    ) -> None:
        self.env, self.net, self.extra = env, net, extra_latency_s
        self.src = np.asarray(src, dtype=np.int64)
        self.dst = np.asarray(dst, dtype=np.int64)
        self.nbytes = np.asarray(nbytes, dtype=float)
        n = len(self.src)
        # every message's route, looked up once: hops of message i are
        # _edge[_offsets[i]:_offsets[i + 1]]
        flow, self._edge, self._latency = net.paths.edge_pairs(self.src, self.dst)
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(flow, minlength=n))])
        self.arrived = np.full(n, np.nan)
        """Absolute delivery time of each message (NaN until its source has sent)."""
        by_src = np.argsort(self.src, kind="stable")
        self._src_keys, src_starts = np.unique(self.src[by_src], return_index=True)
        self._src_split = np.split(by_src, src_starts[1:]) if n else []
        by_dst = np.argsort(self.dst, kind="stable")
        self._dst_keys, dst_starts = np.unique(self.dst[by_dst], return_index=True)
        self._dst_split = np.split(by_dst, dst_starts[1:]) if n else []
        self._pending = np.bincount(self.dst, minlength=int(self.dst.max()) + 1 if n else 0)
        """Messages not yet sent to each device (indexed by device id)."""
        # each source's messages with their routes' hops, gathered once:
        # (messages, hop's message position within them, hop's edge)
        self._src_pairs = [self._pairs(m) for m in self._src_split]
        self._inbound: dict[int, simpy.Event] = {}
        self._last: dict[int, int] = {}
        self._batch: list[int] = []

    def _messages_of(self, keys: np.ndarray, split: list[np.ndarray], who: int) -> np.ndarray:
        i = int(np.searchsorted(keys, who))
        if i < len(keys) and keys[i] == who:
            return split[i]
        return np.zeros(0, dtype=np.int64)

    def send(self, src: int) -> None:
        """Start every message of ``src`` now (priced with the others sent at this instant)."""
        if not self._batch:
            self.env.timeout(0).callbacks.append(self._flush)
        self._batch.append(src)

    def _pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Messages ``idx`` and the (position in ``idx``, edge) pairs of their hops."""
        start, stop = self._offsets[idx], self._offsets[idx + 1]
        lengths = stop - start
        flow = np.repeat(np.arange(len(idx)), lengths)
        return idx, flow, self._edge[ranges(start, lengths)]

    def _batch_pairs(self, sources: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = []
        for s in sources:
            i = int(np.searchsorted(self._src_keys, s))
            if i < len(self._src_keys) and self._src_keys[i] == s:
                parts.append(self._src_pairs[i])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        shift = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] + k for p, k in zip(parts, shift)]),
            np.concatenate([p[2] for p in parts]),
        )

    def _flush(self, _: simpy.Event) -> None:
        sources, self._batch = self._batch, []
        idx, flow, edge = self._batch_pairs(sources)
        if not len(idx):
            return
        self.arrived[idx] = self.net.transfer_routed(
            flow, edge, self._latency[idx], self.nbytes[idx], self.extra
        )
        now = self.env.now
        dst = self.dst[idx]
        self._pending -= np.bincount(dst, minlength=len(self._pending))
        for d in np.unique(dst[self._pending[dst] == 0]).tolist():
            into = self._messages_of(self._dst_keys, self._dst_split, d)
            times = self.arrived[into]
            k = int(np.argmax(times))  # the first message (in message order) among the latest
            self._last[d] = int(self.src[into[k]])
            self.env.timeout(max(0.0, float(times[k]) - now)).callbacks.append(
                self._fire(self.inbound(d))
            )

    @staticmethod
    def _fire(event: simpy.Event) -> Callable[[simpy.Event], None]:
        def fire(_: simpy.Event) -> None:
            event.succeed()

        return fire

    def inbound(self, dst: int) -> simpy.Event:
        """An event that fires once every message to ``dst`` has been delivered."""
        ev = self._inbound.get(dst)
        if ev is None:
            ev = self.env.event()
            self._inbound[dst] = ev
            waiting = int(self._pending[dst]) if dst < len(self._pending) else 0
            if waiting == 0 and dst not in self._last:
                ev.succeed()  # nothing to wait for
        return ev

    def last_sender(self, dst: int) -> int | None:
        """The source whose message reaches ``dst`` last (the first such in message order);
        None until every message to ``dst`` has been sent, or when it receives nothing."""
        return self._last.get(dst)
