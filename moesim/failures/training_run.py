"""A training *run*: many steps over wall-clock time, with failures, checkpoints and
restarts (the ``failures`` section and ``workload.duration_s``).

The step itself comes from :func:`moesim.engine.training.simulate_training` (one step,
simulated); this module plays the run around it, a plain event loop over the failure
plan of :mod:`moesim.failures.plan` (no SimPy: nothing here shares a resource):

- the job runs steps of ``step_s`` (times the slowest straggler's factor: the data-
  parallel ranks synchronize every step; with degraded links the step is simulated again
  on the degraded system, once per link state);
- every checkpoint interval (``interval_steps``, or the first step boundary after
  ``interval_s`` of compute) it stops to write a checkpoint of ``checkpoint_bytes`` =
  every parameter's bf16 weight and its optimizer state (``optimizer_bytes_per_param``),
  written by all hosts in parallel at ``write_gbps`` each (the hosts' NVMe write bandwidth
  by default): ``checkpoint_s = bytes / (hosts x write_gbps)``;
- a device failure (or a device cut off by downed links) stops the job (synchronous
  training needs every device): the work since the last completed checkpoint is lost,
  the job hangs until the failure is noticed (``detect_s``), waits for its devices (a
  hot spare's swap, or a repair), then restarts
  (``restart_s``: relaunch, reload the checkpoint) and redoes the lost steps. A failure
  during the restart starts the wait over.

Closed forms reported next to the simulation (``expected``), with ``M`` the job's mean
time between failures (``1 / sum`` of its devices' failure rates), ``C`` the checkpoint
write, ``tau`` the compute between checkpoints and ``D`` the downtime per failure
(detection, swap or repair, restart):

- Young (1974): optimum interval ``sqrt(2 C M)``; Daly (2006) first order:
  ``sqrt(2 C M) - C``;
- for exponential failures striking only while the job works, one interval of
  ``tau + C`` takes ``E[T] = (exp((tau + C) / M) - 1) (M + D)`` in expectation (each
  attempt is cut short by a failure with probability ``1 - exp(-(tau + C) / M)``), so the
  expected goodput is ``tau / E[T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moesim.config.failures import ExponentialFailures, FailuresConfig, WeibullFailures
from moesim.config.training import TrainingWorkload
from moesim.derived.model_figures import figures
from moesim.engine.training import TrainingRecords, simulate_training
from moesim.failures.degraded import degraded_system
from moesim.failures.plan import HOUR, build_plan
from moesim.failures.state import FailurePlan, FailureState
from moesim.system import System
from moesim.units import GB


@dataclass(frozen=True)
class Span:
    """A stretch of the run: train, checkpoint, down (waiting for devices), restart."""

    kind: str
    start_s: float
    end_s: float
    detail: str = ""


@dataclass
class TrainingRunRecords:
    """What the run produced."""

    duration_s: float
    step_s: float
    tokens_per_step: int
    checkpoint_bytes: int
    checkpoint_s: float
    """Time to write one checkpoint (0 without checkpoints)."""
    interval_steps: int | None
    """Steps between checkpoints (None: no checkpoints)."""
    useful_steps: int = 0
    """Steps whose work survived (checkpointed, or done after the last failure)."""
    computed_steps: int = 0
    """Steps computed, including those lost and redone."""
    lost_steps: int = 0
    interruptions: int = 0
    """Times a failure stopped the job."""
    checkpoints: int = 0
    compute_s: float = 0.0
    checkpoint_total_s: float = 0.0
    lost_s: float = 0.0
    """Working time (steps and checkpoint writes) thrown away by failures."""
    down_s: float = 0.0
    restart_s: float = 0.0
    spans: list[Span] = field(default_factory=list)
    plan: FailurePlan | None = None


def checkpoint_bytes(system: System, w: TrainingWorkload) -> int:
    """Bytes of one checkpoint: every parameter's stored weight (bf16, or the fp32 master
    under autocast) and optimizer state."""
    params = figures(system.scenario.model).total_params
    return int(params * (w.weight_bytes + w.state_bytes))


def checkpoint_write_s(system: System, w: TrainingWorkload) -> float:
    """Time to write one checkpoint, all hosts in parallel (0 without a checkpoint)."""
    s = system.scenario
    ck = s.failures.checkpoint if s.failures is not None else None
    if ck is None:
        return 0.0
    gbps = ck.write_gbps or s.cluster.host.nvme_write_gbps
    hosts = len(system.topology.hosts)
    return checkpoint_bytes(system, w) / (hosts * gbps * GB)


def job_mtbf_s(cfg: FailuresConfig, devices: int) -> float | None:
    """Mean time between failures of the whole job: 1 / sum of its devices' rates."""
    rate = 0.0
    for p in cfg.devices:
        if isinstance(p, ExponentialFailures | WeibullFailures):
            n = devices if p.devices is None else len(set(p.devices))
            rate += n / (p.mtbf_hours * HOUR)
    return 1.0 / rate if rate > 0 else None


def expected(
    cfg: FailuresConfig, devices: int, step_s: float, interval_steps: int | None, c_s: float
) -> dict[str, float | None]:
    """The closed forms of the module docstring (None where they do not apply)."""
    m = job_mtbf_s(cfg, devices)
    rec = cfg.recovery
    ck = cfg.checkpoint
    swap = rec.spare_swap_s if rec.hot_spares > 0 else rec.repair_s
    swap = None if swap is None else rec.detect_s + swap
    out: dict[str, float | None] = {
        "job_mtbf_s": m,
        "young_interval_s": None,
        "daly_interval_s": None,
        "goodput_fraction": None,
    }
    if m is None:
        return out
    if c_s > 0:
        out["young_interval_s"] = math.sqrt(2 * c_s * m)
        out["daly_interval_s"] = max(0.0, math.sqrt(2 * c_s * m) - c_s)
    if swap is not None and ck is not None and interval_steps is not None:
        tau = interval_steps * step_s
        d = swap + ck.restart_s
        e_t = math.expm1((tau + c_s) / m) * (m + d)
        out["goodput_fraction"] = tau / e_t
    return out


class _Run:
    def __init__(self, system: System, w: TrainingWorkload, step: TrainingRecords) -> None:
        s = system.scenario
        assert w.duration_s is not None
        self.system, self.w = system, w
        self.cfg = s.failures or FailuresConfig()
        self.horizon = w.duration_s
        self.plan = build_plan(system, self.horizon)
        self.step_s = step.step_s
        ck = self.cfg.checkpoint
        self.c_s = checkpoint_write_s(system, w)
        self.restart = ck.restart_s if ck is not None else 0.0
        if ck is None:
            self.interval: int | None = None
        elif ck.interval_steps is not None:
            self.interval = ck.interval_steps
        else:
            assert ck.interval_s is not None
            self.interval = max(1, math.ceil(ck.interval_s / self.step_s - 1e-9))
        self._link_step: dict[tuple[tuple[int, str, float], ...], float] = {}
        self.rec = TrainingRunRecords(
            duration_s=self.horizon,
            step_s=self.step_s,
            tokens_per_step=step.tokens_per_step,
            checkpoint_bytes=checkpoint_bytes(system, w) if ck is not None else 0,
            checkpoint_s=self.c_s,
            interval_steps=self.interval,
            plan=self.plan,
        )

    def step_in(self, st: FailureState) -> float:
        base = self.step_s
        if st.links:
            if st.links not in self._link_step:
                only_links = FailureState(links=st.links)
                sys_ = degraded_system(self.system, only_links)
                self._link_step[st.links] = simulate_training(sys_, self.w).step_s
            base = self._link_step[st.links]
        return base * max((f for _, f in st.slow), default=1.0)

    def blocked_from(self, t: float) -> float:
        """The first time at or after ``t`` when a device is dead (inf if never)."""
        i = self.plan.index_at(t)
        for j in range(i, len(self.plan.states)):
            if self.plan.states[j].dead:
                return max(t, self.plan.starts[j])
        return math.inf

    def up_from(self, t: float) -> float:
        """The first time at or after ``t`` when no device is dead (inf if never)."""
        i = self.plan.index_at(t)
        for j in range(i, len(self.plan.states)):
            if not self.plan.states[j].dead:
                return max(t, self.plan.starts[j])
        return math.inf

    def run(self) -> TrainingRunRecords:
        rec, h = self.rec, self.horizon
        t = 0.0
        commit_t = 0.0  # end of the last checkpoint (or restart): lost work counts from here
        since = 0  # steps since the last checkpoint
        running = True  # False from a failure until the restart is done
        while t < h:
            fail = self.blocked_from(t)
            if fail <= t and running:  # a failure exactly at a step boundary
                self._lose(t, t, since, commit_t, "step")
                since, running = 0, False
            if fail <= t:  # down: wait for every device, then restart
                up = min(self.up_from(t), h)
                self._span("down", t, up, self.plan.at(t).describe())
                rec.down_s += up - t
                t = up
                if t >= h:
                    break
                end = min(t + self.restart, h)
                nxt = self.blocked_from(t)
                if nxt < end:  # another failure during the restart: wait again
                    self._span("restart", t, nxt, "interrupted")
                    rec.restart_s += nxt - t
                    t = nxt
                    continue
                if self.restart > 0:
                    self._span("restart", t, end)
                rec.restart_s += end - t
                t = commit_t = end
                running = True
                continue
            # working: steps until the next checkpoint, failure, state change or the end
            st = self.plan.at(t)
            d = self.step_in(st)
            limit = min(fail, h, self.plan.next_change(t))
            if self.interval is not None and since >= self.interval:
                end = t + self.c_s
                if end > fail:  # failure while writing
                    self._lose(t, fail, since, commit_t, "checkpoint write")
                    since, t, running = 0, fail, False
                    continue
                if end > h:
                    break
                self._span("checkpoint", t, end)
                rec.checkpoints += 1
                rec.checkpoint_total_s += self.c_s
                rec.useful_steps += since
                since, t, commit_t = 0, end, end
                continue
            room = self.interval - since if self.interval is not None else math.inf
            n = min(room, math.floor((limit - t) / d + 1e-12))
            if n >= 1:
                n = int(n)
                self._span("train", t, t + n * d, f"{n} steps")
                t += n * d
                since += n
                rec.computed_steps += n
                rec.compute_s += n * d
                continue
            # less than a step before the next boundary: a failure, the end, or a state
            # change (the step runs at the speed of the state it started in)
            if t + d > fail:
                self._lose(t, fail, since, commit_t, "step")
                since, t, running = 0, fail, False
                continue
            if t + d > h:
                break
            self._span("train", t, t + d, "1 step")
            t += d
            since += 1
            rec.computed_steps += 1
            rec.compute_s += d
        rec.useful_steps += since  # the run ended with these steps done
        return rec

    def _lose(self, t: float, fail: float, since: int, commit_t: float, what: str) -> None:
        rec = self.rec
        rec.interruptions += 1
        rec.lost_steps += since
        rec.lost_s += fail - commit_t
        if fail > t:
            self._span("lost", t, fail, f"failure during a {what}")
            if what == "step":
                rec.compute_s += fail - t
            else:
                rec.checkpoint_total_s += fail - t

    def _span(self, kind: str, a: float, b: float, detail: str = "") -> None:
        spans = self.rec.spans
        if spans and spans[-1].kind == kind == "train" and spans[-1].end_s == a:
            prev = spans[-1]
            spans[-1] = replace(prev, end_s=b, detail="")
        else:
            spans.append(Span(kind, a, b, detail))


def simulate_training_run(
    system: System, w: TrainingWorkload, step: TrainingRecords | None = None
) -> TrainingRunRecords:
    """Play a training run of ``w.duration_s`` around one simulated step."""
    if w.duration_s is None:
        raise ValueError("a training run needs workload.duration_s")
    if step is None:
        step = simulate_training(system, w)
    return _Run(system, w, step).run()
