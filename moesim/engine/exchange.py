"""One all-to-all phase over the network, message by message: direct or hierarchical, on
any back-end of :class:`moesim.engine.netapi.Network` (DeepEP's kernels are
:mod:`moesim.engine.deepep`).

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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

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
