"""One all-to-all phase over the network, message by message: direct, hierarchical or
DeepEP-style, on any back-end of :class:`moesim.engine.netapi.Network`.

Messages are ``(src, dst, bytes)``; each has a delivery event. A source starts sending when
it calls :meth:`Exchange.send` (when its data is ready), so sources that finish early send
early.

- ``direct``: every message is one flow from src to dst over the graph's route.
- ``hierarchical`` (2-D, as in Tutel / DeepSpeed-MoE's hierarchical all-to-all): a
  message that crosses nodes first goes over the scale-up fabric to the GPU of the *source*
  node that has the destination's local index (its rail), and from there across nodes to
  the destination; the relay forwards one aggregated message per destination once every
  contribution from its node has arrived. Inter-node traffic thus moves on rail-aligned
  NICs in fewer, larger messages. Each hop pays the collective's fixed cost
  (``extra_latency_s``): a hierarchical exchange is two collective calls.
- ``deepep`` (:class:`DedupExchange`; DeepSeek-V3 report, Sec. 3.2.2, and DeepEP's
  normal kernels): a token crosses the fabric once per destination node, whatever number
  of experts it uses there. Dispatch goes first across nodes, to the GPU of the destination
  node on the source's rail, then over the scale-up fabric to each expert; combine goes
  first inside the expert's node to that rail GPU, which sums the token's partial results,
  then across nodes once per token.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import simpy

from moesim.config.parallelism import A2AAlgorithm
from moesim.engine.netapi import Network


class _Deliveries:
    """Delivery events of an exchange's messages and when each arrived."""

    env: simpy.Environment
    delivered: dict[tuple[int, int], simpy.Event]
    arrived_s: dict[tuple[int, int], float]
    _into: dict[int, list[int]]

    def _index(self, messages: Sequence[tuple[int, int, float]]) -> None:
        """The delivery event of every message and the senders of each receiver, in order."""
        self.delivered = {(s, d): self.env.event() for s, d, _ in messages}
        self.arrived_s = {}
        self._into = defaultdict(list)
        for s, d, _ in messages:
            self._into[d].append(s)

    def inbound(self, dst: int) -> simpy.Event:
        """An event that fires once every message to ``dst`` has been delivered."""
        return self.env.all_of([self.delivered[(s, dst)] for s in self._into.get(dst, [])])

    def last_sender(self, dst: int) -> int | None:
        """The source whose message reached ``dst`` last (the first such in message order);
        None before all have arrived or when ``dst`` receives nothing."""
        senders = self._into.get(dst, [])
        if not senders or any((s, dst) not in self.arrived_s for s in senders):
            return None
        return max(senders, key=lambda s: self.arrived_s[(s, dst)])

    def _deliver_cb(self, keys: list[tuple[int, int]]) -> Callable[[simpy.Event], None]:
        """A callback that marks ``keys`` delivered now."""

        def fire(_: simpy.Event) -> None:
            for key in keys:
                self.arrived_s[key] = self.env.now
                self.delivered[key].succeed()

        return fire


class Exchange(_Deliveries):
    """The flows of one all-to-all phase and their delivery events."""

    def __init__(
        self,
        env: simpy.Environment,
        net: Network,
        messages: Sequence[tuple[int, int, float]],
        algorithm: A2AAlgorithm,
        node_of: Sequence[int],
        device_at: dict[tuple[int, int], int],
        local_of: Sequence[int],
        extra_latency_s: float = 0.0,
    ) -> None:
        self.env, self.net, self.extra = env, net, extra_latency_s
        self._index(messages)
        self._out: dict[int, list[tuple[int, float]]] = defaultdict(list)
        self._relay: dict[tuple[int, int], int] = {}
        self._pending: dict[tuple[int, int], int] = defaultdict(int)
        self._bytes: dict[tuple[int, int], float] = defaultdict(float)
        self._members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for s, d, b in messages:
            self._out[s].append((d, b))
            if algorithm == "hierarchical" and node_of[s] != node_of[d]:
                r = device_at.get((node_of[s], local_of[d]), s)
                self._relay[(s, d)] = r
                self._pending[(r, d)] += 1
                self._bytes[(r, d)] += b
                self._members[(r, d)].append(s)

    def send(self, src: int) -> None:
        """Start every message of ``src`` now (first hops of relayed ones)."""
        direct, hop1, local = [], [], []
        for d, b in self._out.get(src, []):
            r = self._relay.get((src, d))
            if r is None:
                direct.append((src, d, b))
            elif r == src:
                local.append(d)
            else:
                hop1.append((src, r, b, d))
        remote = self.extra if any(s != d for s, d, _ in direct) else 0.0
        for (s, d, _), ev in zip(direct, self.net.transfer_many(direct, remote)):
            ev.callbacks.append(self._deliver_cb([(s, d)]))
        flows = [(s, r, b) for s, r, b, _ in hop1]
        for (_, r, _, d), ev in zip(hop1, self.net.transfer_many(flows, self.extra)):
            ev.callbacks.append(self._contribute_cb(r, d))
        for d in local:
            self._contribute(src, d)

    def _contribute_cb(self, r: int, d: int) -> Callable[[simpy.Event], None]:
        return lambda _: self._contribute(r, d)

    def _contribute(self, r: int, d: int) -> None:
        self._pending[(r, d)] -= 1
        if self._pending[(r, d)]:
            return
        keys = [(s, d) for s in self._members[(r, d)]]
        (ev,) = self.net.transfer_many([(r, d, self._bytes[(r, d)])], self.extra)
        ev.callbacks.append(self._deliver_cb(keys))


class DedupExchange(_Deliveries):
    """An all-to-all phase that sends each token once per node across the fabric.

    ``messages`` are per expert device as in :class:`Exchange`; ``node_bytes[(rank, node)]``
    gives the deduplicated bytes a source rank exchanges with a node (its distinct tokens
    there times the bytes per token). ``direction`` is ``"dispatch"`` (rank -> experts) or
    ``"combine"`` (experts -> rank).
    """

    def __init__(
        self,
        env: simpy.Environment,
        net: Network,
        messages: Sequence[tuple[int, int, float]],
        direction: Literal["dispatch", "combine"],
        node_of: Sequence[int],
        device_at: dict[tuple[int, int], int],
        local_of: Sequence[int],
        node_bytes: dict[tuple[int, int], float],
        extra_latency_s: float = 0.0,
    ) -> None:
        self.env, self.net, self.extra = env, net, extra_latency_s
        self.direction = direction
        self.node_of, self.device_at, self.local_of = node_of, device_at, local_of
        self.node_bytes = node_bytes
        self._index(messages)
        self._out: dict[int, list[tuple[int, float]]] = defaultdict(list)
        # combine: contributions awaited by (relay, rank) before the one cross-node send
        self._pending: dict[tuple[int, int], int] = defaultdict(int)
        self._members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for s, d, b in messages:
            self._out[s].append((d, b))
            if direction == "combine" and node_of[s] != node_of[d]:
                relay = self._relay(node_of[s], d)
                self._pending[(relay, d)] += 1
                self._members[(relay, d)].append(s)

    def _relay(self, node: int, rank: int) -> int:
        """The GPU of ``node`` on ``rank``'s rail."""
        return self.device_at.get((node, self.local_of[rank]), rank)

    def send(self, src: int) -> None:
        """Start every message of ``src`` now."""
        if self.direction == "dispatch":
            self._dispatch(src)
        else:
            self._combine(src)

    def _dispatch(self, src: int) -> None:
        local, by_node = [], defaultdict(list)
        for d, b in self._out.get(src, []):
            if self.node_of[d] == self.node_of[src]:
                local.append((src, d, b))
            else:
                by_node[self.node_of[d]].append((d, b))
        extra = self.extra if any(s != d for s, d, _ in local) else 0.0
        for (s, d, _), ev in zip(local, self.net.transfer_many(local, extra)):
            ev.callbacks.append(self._deliver_cb([(s, d)]))
        hops = [(src, self._relay(n, src), self.node_bytes.get((src, n), 0.0)) for n in by_node]
        for (n, targets), ev in zip(by_node.items(), self.net.transfer_many(hops, self.extra)):
            ev.callbacks.append(self._forward(src, self._relay(n, src), targets))

    def _forward(
        self, src: int, relay: int, targets: list[tuple[int, float]]
    ) -> Callable[[simpy.Event], None]:
        def fire(_event: simpy.Event) -> None:
            flows = [(relay, d, b) for d, b in targets]
            extra = self.extra if any(r != d for r, d, _ in flows) else 0.0
            for (_r, d, _b), ev in zip(flows, self.net.transfer_many(flows, extra)):
                ev.callbacks.append(self._deliver_cb([(src, d)]))

        return fire

    def _combine(self, src: int) -> None:
        direct, hop1, at_relay = [], [], []
        for d, b in self._out.get(src, []):
            if self.node_of[d] == self.node_of[src]:
                direct.append((src, d, b))
                continue
            relay = self._relay(self.node_of[src], d)
            if relay == src:
                at_relay.append((relay, d))
            else:
                hop1.append((src, relay, b, d))
        extra = self.extra if any(s != d for s, d, _ in direct) else 0.0
        for (s, d, _), ev in zip(direct, self.net.transfer_many(direct, extra)):
            ev.callbacks.append(self._deliver_cb([(s, d)]))
        flows = [(s, r, b) for s, r, b, _ in hop1]
        for (_, r, _, d), ev in zip(hop1, self.net.transfer_many(flows, self.extra)):
            ev.callbacks.append(self._arrive_cb(r, d))
        for r, d in at_relay:
            self._arrive(r, d)

    def _arrive_cb(self, relay: int, rank: int) -> Callable[[simpy.Event], None]:
        return lambda _: self._arrive(relay, rank)

    def _arrive(self, relay: int, rank: int) -> None:
        """One expert's partial results reached the relay; the last one triggers the send."""
        self._pending[(relay, rank)] -= 1
        if self._pending[(relay, rank)]:
            return
        nbytes = self.node_bytes.get((rank, self.node_of[relay]), 0.0)
        keys = [(s, rank) for s in self._members[(relay, rank)]]
        (ev,) = self.net.transfer_many([(relay, rank, nbytes)], self.extra)
        ev.callbacks.append(self._deliver_cb(keys))
