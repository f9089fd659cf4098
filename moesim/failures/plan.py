"""The failure plan of a run: the ``failures`` section turned into a time-ordered list of
events and piecewise-constant failure states (:class:`~moesim.failures.state.FailurePlan`).

Device failures are drawn before the run from per-device streams
``rng.stream(seed, "failures", process, device)`` (exponential or Weibull times to
failure), or scheduled: each device alternates up periods (time to failure from each of
its processes, the earliest wins) and down periods (a hot spare's swap time when one is
free, else the repair time; the repaired device then becomes a spare again). Link
windows (a port degraded or down) and straggler windows (a device computing slower) open
and close at given times. A device cut off from the others by downed links counts as
dead. The failure processes run on wall-clock time whatever the job does, so the same
seed gives the same failures to every workload and every recovery policy (common random
numbers: policies are compared on the same failures).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import replace

import numpy as np

from moesim import rng
from moesim.config.failures import (
    ExponentialFailures,
    FailuresConfig,
    ScheduledFailure,
    WeibullFailures,
)
from moesim.failures.degraded import unreachable
from moesim.failures.state import FailureEvent, FailurePlan, FailureState
from moesim.system import System

HOUR = 3600.0


def _ttf_s(cfg: ExponentialFailures | WeibullFailures, gen: np.random.Generator) -> float:
    mean = cfg.mtbf_hours * HOUR
    if isinstance(cfg, ExponentialFailures):
        return float(gen.exponential(mean))
    scale = mean / math.gamma(1.0 + 1.0 / cfg.shape)
    return float(scale * gen.weibull(cfg.shape))


def device_events(
    cfg: FailuresConfig, devices: int, seed: int, horizon_s: float
) -> list[FailureEvent]:
    """Device failures and recoveries over ``[0, horizon_s)`` (see the module docstring)."""
    rec = cfg.recovery
    procs = [
        (i, p, range(devices) if p.devices is None else p.devices)
        for i, p in enumerate(cfg.devices)
        if not isinstance(p, ScheduledFailure)
    ]
    by_device: dict[int, list[tuple[int, ExponentialFailures | WeibullFailures]]] = {}
    for i, p, devs in procs:
        assert not isinstance(p, ScheduledFailure)
        for d in devs:
            by_device.setdefault(d, []).append((i, p))
    gens = {
        (i, d): rng.stream(seed, "failures", i, d) for d, ps in by_device.items() for i, _ in ps
    }
    heap: list[tuple[float, int, str, int, int]] = []  # time, order, kind, device, generation
    order = 0

    def push(t: float, kind: str, d: int, gen_no: int = -1) -> None:
        nonlocal order
        if t < horizon_s:
            heapq.heappush(heap, (t, order, kind, d, gen_no))
            order += 1

    generation = dict.fromkeys(range(devices), 0)

    def arm(d: int, t: float) -> None:
        ps = by_device.get(d)
        if ps:
            push(t + min(_ttf_s(p, gens[(i, d)]) for i, p in ps), "fail", d, generation[d])

    for d in range(devices):
        arm(d, 0.0)
    for sched in cfg.devices:
        if isinstance(sched, ScheduledFailure):
            push(sched.at_s, "fail", sched.device)
    up = [True] * devices
    spares = rec.hot_spares
    out: list[FailureEvent] = []
    while heap:
        t, _, kind, d, gen_no = heapq.heappop(heap)
        if kind == "fail":
            if gen_no >= 0 and gen_no != generation[d]:
                continue  # a time to failure drawn before the device's last failure
            if not up[d]:  # only a scheduled failure can hit a device that is down
                out.append(FailureEvent(t, "ignored", d, "ignored: device already down"))
                continue
            up[d] = False
            generation[d] += 1
            noticed = t + rec.detect_s
            if rec.detect_s > 0:
                push(noticed, "detected", d)
            if spares > 0:
                spares -= 1
                out.append(FailureEvent(t, "fail", d, "a hot spare takes over"))
                push(noticed + rec.spare_swap_s, "recover", d)
                if rec.repair_s is not None:
                    push(noticed + rec.repair_s, "spare_back", d)
            else:
                out.append(
                    FailureEvent(
                        t, "fail", d, "no spare: repair" if rec.repair_s else "no spare, no repair"
                    )
                )
                if rec.repair_s is not None:
                    push(noticed + rec.repair_s, "recover", d)
        elif kind == "detected":
            out.append(FailureEvent(t, "detected", d))
        elif kind == "recover":
            up[d] = True
            out.append(FailureEvent(t, "recover", d))
            arm(d, t)
        else:  # spare_back: the repaired device joins the spare pool
            spares += 1
    return out


def build_plan(system: System, horizon_s: float) -> FailurePlan:
    """Every failure event of the run and the states between them."""
    s = system.scenario
    cfg = s.failures or FailuresConfig()
    n = len(system.topology.devices)
    events = device_events(cfg, n, s.seed, horizon_s)
    for link in cfg.links:
        frac = 0.0 if link.down else link.bandwidth_fraction
        what = f"{link.link} {'down' if link.down else f'at {frac:g} of its bandwidth'}"
        events.append(FailureEvent(link.at_s, "link_degraded", link.device, what))
        if link.until_s is not None:
            events.append(FailureEvent(link.until_s, "link_restored", link.device, link.link))
    for sg in cfg.stragglers:
        events.append(
            FailureEvent(sg.from_s, "straggler_start", sg.device, f"x{sg.slowdown:g} slower")
        )
        if sg.until_s is not None:
            events.append(FailureEvent(sg.until_s, "straggler_end", sg.device))
    events = sorted((e for e in events if e.time_s < horizon_s), key=lambda e: e.time_s)
    times = sorted({0.0, *(e.time_s for e in events)})
    states: list[FailureState] = []
    dead_at: list[frozenset[int]] = []
    stalled_at: list[frozenset[int]] = []
    dead: set[int] = set()
    stalled: set[int] = set()
    it = iter(events)
    pending = next(it, None)
    for t in times:
        while pending is not None and pending.time_s <= t:
            if pending.kind == "fail":
                dead.add(pending.device)
                if cfg.recovery.detect_s > 0:
                    stalled.add(pending.device)
            elif pending.kind == "detected":
                stalled.discard(pending.device)
            elif pending.kind == "recover":
                dead.discard(pending.device)
                stalled.discard(pending.device)
            pending = next(it, None)
        dead_at.append(frozenset(dead))
        stalled_at.append(frozenset(stalled))
    for t, dead_now, stalled_now in zip(times, dead_at, stalled_at):
        slow = tuple(
            (x.device, x.slowdown)
            for x in cfg.stragglers
            if x.from_s <= t and (x.until_s is None or t < x.until_s) and x.device not in dead_now
        )
        links = tuple(
            (x.device, x.link, 0.0 if x.down else x.bandwidth_fraction)
            for x in cfg.links
            if x.at_s <= t and (x.until_s is None or t < x.until_s)
        )
        state = FailureState(dead_now, slow, links, stalled_now)
        if links:
            cut = unreachable(system.topology, state)
            if cut - dead_now:
                state = replace(state, dead=dead_now | cut)
        states.append(state)
    # merge stretches whose state does not change
    starts: list[float] = []
    merged: list[FailureState] = []
    for t, st in zip(times, states):
        if not merged or merged[-1] != st:
            starts.append(t)
            merged.append(st)
    return FailurePlan(tuple(events), tuple(starts), tuple(merged), horizon_s)
