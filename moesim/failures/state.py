"""The failure state types: what is broken during one stretch of a run
(:class:`FailureState`), what happened (:class:`FailureEvent`), and the run's
piecewise-constant timeline of states (:class:`FailurePlan`, built by
:func:`moesim.failures.plan.build_plan`). Plain data, no I/O."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


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
