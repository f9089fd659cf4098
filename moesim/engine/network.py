"""The network as a SimPy component: flows share links max-min fairly as they come and go.

A transfer is a flow of bytes along a path. Whenever a flow starts or ends, the rates of
all active flows are recomputed (:func:`moesim.cost.fairshare.max_min_rates`); the next
event is the earliest completion. A flow's delivery event fires after its last byte has
left plus the path's latency. One event per flow start/end, never per byte or token.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from moesim.cost.fairshare import incidence, max_min_rates
from moesim.topology.paths import PathTable


@dataclass
class _Flow:
    path: np.ndarray
    remaining: float
    latency_s: float
    done: simpy.Event
    size: float


@dataclass
class FlowNetwork:
    """Bytes in flight over a topology, with max-min fair link sharing."""

    env: simpy.Environment
    paths: PathTable
    active: list[_Flow] = field(default_factory=list)
    link_bytes: np.ndarray = field(init=False)
    """Bytes carried by each directed edge so far."""
    events: int = 0
    """Rate recomputations performed (for benchmarks)."""

    def __post_init__(self) -> None:
        self.capacity = self.paths.bandwidth_gbps * 1e9
        self.link_bytes = np.zeros(len(self.capacity))
        self._rates = np.zeros(0)
        self._last = 0.0
        self._version = 0

    def transfer_many(
        self, flows: Sequence[tuple[int, int, float]], extra_latency_s: float = 0.0
    ) -> list[simpy.Event]:
        """Start flows ``(src device, dst device, bytes)`` now; one delivery event each.

        ``extra_latency_s`` is a fixed cost added to every flow's delivery (a collective's
        launch and synchronisation, as measured)."""
        self._advance()
        out = []
        for src, dst, nbytes in flows:
            ev = self.env.event()
            out.append(ev)
            if src == dst or nbytes <= 0:
                ev.succeed()
                continue
            path = self.paths.edge_ids(src, dst)
            self.link_bytes[path] += nbytes
            self.active.append(
                _Flow(
                    path,
                    float(nbytes),
                    self.paths.latency_s(src, dst) + extra_latency_s,
                    ev,
                    float(nbytes),
                )
            )
        self._reschedule()
        return out

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and self.active:
            for f, r in zip(self.active, self._rates):
                f.remaining -= r * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        self._version += 1
        if not self.active:
            return
        self.events += 1
        links, a = incidence([f.path for f in self.active])
        self._rates = max_min_rates(a, self.capacity[links])
        left = np.array([f.remaining for f in self.active])
        wait = float(np.min(np.maximum(left, 0.0) / self._rates))
        self.env.process(self._wake(self._version, wait))

    def _wake(self, version: int, wait: float) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(wait)
        if version != self._version:
            return  # a newer flow changed the rates; a newer wake-up is pending
        self._advance()
        still = []
        for f, r in zip(self.active, self._rates):
            # flows due within a hair of now finish together (equal sizes, same rate)
            if f.remaining <= 1e-9 * f.size + 1e-6 or f.remaining / r <= 1e-12:
                self.env.process(self._deliver(f))
            else:
                still.append(f)
        self.active = still
        self._reschedule()

    def _deliver(self, f: _Flow) -> Generator[simpy.Event, Any, None]:
        if f.latency_s > 0:
            yield self.env.timeout(f.latency_s)
        f.done.succeed()
