"""The serving side of failure and recovery: :class:`ServingFailures`, the failure hooks
of the serving loop (:class:`moesim.engine.serving_hooks.ServingHooks`), and
:func:`simulate_serving_with_failures`, the serving run of a scenario with or without a
``failures`` section.

State changes take effect at iteration boundaries (the iteration in flight when a device
fails completes). Until a failure is noticed (``recovery.detect_s``) the server stalls:
every rank waits on the dead device's collectives. When a data-parallel rank loses a
device, its running and waiting requests are requeued at the front of the live ranks'
queues (their KV is lost and recomputed, counted like a preemption) or lost; new
requests go round-robin to live ranks; with no live rank the server waits for a
recovery. A recovered device rejoins with an empty KV cache. Each failure state's
iteration is costed once on its degraded system (:func:`~moesim.failures.degraded.
degraded_system`, :class:`~moesim.failures.cost.FailedMoECost`), memoized by state.

**Stragglers.** The ranks run in lock-step, so an iteration's attention, dense and head
parts (with their TP collectives: an upper bound for tp > 1) take the slowest busy rank's
factor; the MoE layers stretch in :class:`~moesim.failures.cost.FailedMoECost`.

Standby expert replicas take KV memory (:func:`kv_blocks_with_replicas`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.cost.iteration import IterationCost, IterationTime
from moesim.cost.layer_cost import MoELayerCost
from moesim.derived.replica_memory import replica_bytes
from moesim.derived.serving_memory import ServingMemory
from moesim.engine.batching import RankScheduler, RequestState
from moesim.engine.serving import DRAIN_CAP, ServingRecords, simulate_serving
from moesim.failures.cost import FailedMoECost, FailureShares
from moesim.failures.degraded import degraded_system
from moesim.failures.plan import build_plan
from moesim.failures.state import FailurePlan, FailureState
from moesim.system import System


def kv_blocks_with_replicas(s: Scenario, mem: ServingMemory) -> int:
    """KV blocks of one data-parallel rank once the replicas took their memory."""
    w = s.workload
    assert isinstance(w, ServingWorkload)
    left = mem.device_bytes - mem.weight_bytes - replica_bytes(s)
    tokens = math.floor(w.kv_cache_fraction * max(0, left)) // mem.kv_bytes_per_token
    return int(tokens // w.scheduler.block_tokens)


@dataclass(frozen=True)
class ServingFailureRecords:
    """What failures did to a serving run."""

    plan: FailurePlan
    iteration_state: np.ndarray
    """Index into ``plan.states`` of each iteration (the state at its start)."""
    failed_over_fraction: np.ndarray
    """Per iteration: expected share of MoE slots sent to replicas."""
    rerouted_fraction: np.ndarray
    """Per iteration: expected share of MoE slots rerouted to a next choice."""
    lost_fraction: np.ndarray
    """Per iteration: expected share of MoE slots dropped because their expert was dead."""
    lost_requests: np.ndarray
    """Per request: lost with its failed rank (``on_rank_loss: lose``)."""
    requeued: int
    """Requests moved off failed ranks."""
    requeue_recomputed_tokens: int
    """Tokens whose KV was lost with a failed rank and computed again."""
    moe_layers: int
    top_k: int


class ServingFailures:
    """The serving loop's failure hooks (a :class:`~moesim.engine.serving_hooks.
    ServingHooks`): state changes at iteration boundaries, rank liveness, and iteration
    costs per failure state, over a plan of ``horizon_s``."""

    def __init__(self, system: System, horizon_s: float) -> None:
        s = system.scenario
        assert s.failures is not None
        self.system = system
        self.cfg = s.failures
        self.plan = build_plan(system, horizon_s)
        self.dp = s.parallelism.dp
        self.tp = s.parallelism.tp
        self.costs: dict[FailureState, tuple[IterationCost, FailedMoECost]] = {}
        self.index = 0
        self.dead_dp: frozenset[int] = frozenset()
        self.pending: list[int] = []
        self.lost: set[int] = set()
        self.requeued = 0
        self.recomputed = 0
        self.rows: list[tuple[int, float, float, float]] = []
        self._rr = 0
        self.n_moe = len(s.model.moe_layer_indices)
        self.top_k = s.model.top_k

    def _dead_dp(self, state: FailureState) -> frozenset[int]:
        stage = self.dp * self.tp
        return frozenset((d % stage) // self.tp for d in state.dead)

    def kv_blocks(self, mem: ServingMemory, blocks: int) -> int:
        """Standby expert replicas take KV memory."""
        return kv_blocks_with_replicas(self.system.scenario, mem)

    def rank_for(self, rid: int, now_s: float) -> int | None:
        """A live rank for a new request (round-robin over the live ranks), None if none."""
        dead = self._dead_dp(self.plan.at(now_s))
        alive = [r for r in range(self.dp) if r not in dead]
        if not alive:
            return None
        self._rr += 1
        return alive[(self._rr - 1) % len(alive)]

    def hold(self, rid: int) -> None:
        """A request that arrived while no rank was live."""
        self.pending.append(rid)

    def advance(
        self, now_s: float, ranks: Sequence[RankScheduler], state: RequestState, rank_of: np.ndarray
    ) -> float:
        """Apply the state changes up to ``now_s``; the time to wait for a live rank (0 when
        one is live, inf when none will be)."""
        self.index = self.plan.index_at(now_s)
        st = self.plan.states[self.index]
        if st.stalled:  # a failure nobody noticed yet: every rank waits on it
            return self.plan.next_change(now_s) - now_s
        dead = self._dead_dp(st)
        for r in sorted(dead - self.dead_dp):
            sched = ranks[r]
            gone = sorted({*sched.running, *sched.waiting})
            sched.running.clear()
            sched.waiting.clear()
            for rid in gone:
                state.blocks[rid] = 0
                if self.cfg.recovery.on_rank_loss == "lose":
                    self.lost.add(rid)
                    continue
                state.recomputed[rid] += state.computed[rid]
                self.recomputed += state.computed[rid]
                state.computed[rid] = 0
                self.pending.append(rid)
                self.requeued += 1
            sched.free_blocks = sched.total_blocks
        self.dead_dp = dead
        alive = [r for r in range(self.dp) if r not in dead]
        if not alive:
            nxt = now_s
            while True:
                nxt = self.plan.next_change(nxt)
                if nxt == math.inf or len(self._dead_dp(self.plan.at(nxt))) < self.dp:
                    return nxt - now_s
        if self.pending:
            per: dict[int, list[int]] = {}
            for k, rid in enumerate(sorted(self.pending)):
                r = alive[k % len(alive)]
                per.setdefault(r, []).append(rid)
                rank_of[rid] = r
            for r, rids in per.items():
                ranks[r].waiting.extendleft(reversed(rids))
            self.pending.clear()
        return 0.0

    def _cost(self, state: FailureState, base: IterationCost) -> IterationCost:
        """The iteration cost of a failure state on its degraded system (memoized)."""
        if state.healthy:
            return base
        hit = self.costs.get(state)
        if hit is None:
            sys_ = degraded_system(self.system, state)
            healthy = base.moe_cost
            if not isinstance(healthy, MoELayerCost):  # pragma: no cover - wiring error
                raise TypeError("a failure state's cost wraps the simulated MoELayerCost")
            moe = FailedMoECost(
                sys_,
                healthy,
                dead=state.dead,
                mode=self.cfg.recovery.on_expert_loss,
                slow=state.slow,
            )
            hit = (IterationCost(sys_, moe), moe)
            self.costs[state] = hit
        return hit[0]

    def iteration_time(
        self,
        cost: IterationCost,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """The iteration's time in the current state (stragglers applied), logged;
        ``cost`` is the healthy system's."""
        st = self.plan.states[self.index]
        now = self._cost(st, cost)
        it = now.time(tokens, keys, kv_read_tokens, sampled)
        n = int(sum(tokens))
        failed = self.costs.get(st)
        shares = failed[1].sample_with_shares(n)[1] if failed is not None else FailureShares()
        if st.slow:
            busy = [r for r, t in enumerate(tokens) if t > 0]
            f = max(
                (st.slowdown(r * self.tp + x) for r in busy for x in range(self.tp)), default=1.0
            )
            # a straggler slows the device's kernels; the host-side time is unchanged
            parts = (it.attention_s * f, it.moe_s, it.dense_s * f, it.head_s * f)
            host = now.host_s(tokens, sampled, kv_read_tokens)
            it = now.with_host(parts, it.dropped_fraction, it.moe_comm_s, host)
        self.rows.append((self.index, shares.failed_over, shares.rerouted, shares.lost))
        return it

    def records(self, requests: int) -> ServingFailureRecords:
        cols = np.array(self.rows, dtype=float).reshape(-1, 4)
        lost = np.zeros(requests, dtype=bool)
        lost[sorted(self.lost)] = True
        return ServingFailureRecords(
            plan=self.plan,
            iteration_state=cols[:, 0].astype(np.int64),
            failed_over_fraction=cols[:, 1],
            rerouted_fraction=cols[:, 2],
            lost_fraction=cols[:, 3],
            lost_requests=lost,
            requeued=self.requeued,
            requeue_recomputed_tokens=self.recomputed,
            moe_layers=self.n_moe,
            top_k=self.top_k,
        )


def serving_hooks(system: System) -> ServingFailures | None:
    """The failure hooks of a serving scenario (None without a ``failures`` section),
    over a plan as long as the run can last (``DRAIN_CAP x duration_s``)."""
    s = system.scenario
    if s.failures is None:
        return None
    w = s.workload
    assert isinstance(w, ServingWorkload)
    return ServingFailures(system, DRAIN_CAP * w.duration_s)


def simulate_serving_with_failures(
    system: System, moe_cost: MoELayerCost | None = None
) -> ServingRecords:
    """Run a ``serving`` scenario, its ``failures`` section included (the engine's
    :func:`~moesim.engine.serving.simulate_serving` with :func:`serving_hooks`);
    ``moe_cost`` is the healthy layer cost, shareable as there."""
    return simulate_serving(system, moe_cost, serving_hooks(system))
