"""The network API the exchanges program against: start transfers, get delivery events,
read the link counters.

As in ASTRA-sim, the network model sits behind one small interface and the back-end is
chosen when the network is built, never by flipping a flag on a shared object. The
back-ends (:mod:`moesim.engine.network`) are

- :class:`~moesim.engine.network.FlowNetwork`: flow by flow, every flow start and end
  re-rates the flows in flight (max-min fair sharing);
- :class:`~moesim.engine.network.BatchedFlowNetwork`: the flows started at one simulated
  instant are priced as one batch from the links' loads (:mod:`moesim.cost.fluid`), with a
  delivery event per flow; for large relayed all-to-alls.

Both also price whole batches given as arrays (:meth:`Network.transfer_routed`, one event
for the caller to schedule per receiver; :class:`moesim.engine.bulk_exchange.BulkExchange`).
The MoE layer simulation picks the back-end by the layer's message count
(:func:`moesim.engine.layer_sim.layer_network`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import simpy

from moesim.topology.paths import PathTable


class Network(Protocol):
    """Bytes moved between devices over a topology, as SimPy events."""

    env: simpy.Environment
    paths: PathTable
    link_bytes: np.ndarray
    """Bytes carried by each directed edge so far."""
    sent_bytes: float
    """Bytes of every flow injected between distinct devices (each hop of a relay counts)."""
    events: int
    """Rate recomputations or batch pricings performed (for benchmarks and summaries)."""

    def transfer_many(
        self, flows: Sequence[tuple[int, int, float]], extra_latency_s: float = 0.0
    ) -> list[simpy.Event]:
        """Start flows ``(src device, dst device, bytes)`` now; one delivery event each,
        fired after the last byte has left plus the route's latency and
        ``extra_latency_s``. Local copies and empty flows are delivered at once."""
        ...

    def transfer_routed(
        self,
        flow: np.ndarray,
        edge: np.ndarray,
        latency_s: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_s: float = 0.0,
    ) -> np.ndarray:
        """Flows starting now, given by their routes' ``(flow, edge)`` incidence pairs,
        priced as one batch; returns each flow's absolute delivery time (no events)."""
        ...
