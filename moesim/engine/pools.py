"""Prefill/decode disaggregation (issue 16): a prefill pool and a decode pool of serving
instances in one SimPy environment, coupled by the KV transfer.

Each instance is the co-located serving loop (:class:`moesim.engine.serving._Server`) on
its own system (the instance's nodes and layout), fed from outside:

- **prefill** instances see every request with one output token, so a request finishes
  there when its first token is sampled (chunked prefill, batching and the KV cache as
  the pool's scheduler says);
- the prompt's KV is then sent to the request's decode rank
  (:func:`moesim.engine.kv_transfer.kv_transfer_s`, over the whole cluster's topology,
  from the prefill rank's devices to the decode rank's): the transfer is on the
  request's critical path, and the first token reaches the user when it lands (TTFT
  includes it; a request of one output token is done at its prefill and sends nothing);
- **decode** instances receive the request with its prompt computed and one token
  generated, allocate its KV blocks when admitted, and decode it to the end.

Requests pick their prefill and decode (instance, rank) when they arrive and when their
prefill ends: in turn (``round_robin``) or the one with the least outstanding work
(``least_loaded``: prompt tokens not yet prefilled; requests not yet finished). A request
whose prompt cannot fit a prefill rank's cache, or whose prompt and output cannot fit a
decode rank's, is rejected on arrival. Transfers do not contend with each other or with
the all-to-all (the instances' layer costs see their own nodes only).

Determinism: the requests are drawn once (:func:`moesim.engine.serving.arrival_times`),
SimPy orders simultaneous events by creation; no other randomness.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import simpy

from moesim.config.serving import ServingWorkload
from moesim.cost.layer_cost import MoELayerCost
from moesim.engine.dual_batch import dual_batch_hooks
from moesim.engine.kv_transfer import kv_route, kv_transfer_bytes
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.engine.serving import DRAIN_CAP, ServingRecords, _Server, arrival_times
from moesim.engine.serving_hooks import HealthyServing
from moesim.system import System
from moesim.topology.paths import PathTable


@dataclass(frozen=True)
class PoolSpec:
    """One pool as the engine runs it: the system of one instance (its nodes, layout,
    scheduler) and where its instances sit in the whole cluster."""

    system: System
    instances: int
    first_device: int
    """Global device id of the first instance's device 0 (instances follow each other)."""
    micro_batches: int = 1
    """2: iterations run as two overlapped micro-batches (:mod:`moesim.engine.dual_batch`)."""

    @property
    def devices_per_instance(self) -> int:
        return self.system.scenario.parallelism.devices

    def rank_devices(self, instance: int, rank: int) -> list[int]:
        """Global device ids of a data-parallel rank's tensor-parallel group."""
        tp = self.system.scenario.parallelism.tp
        base = self.first_device + instance * self.devices_per_instance + rank * tp
        return list(range(base, base + tp))


@dataclass(frozen=True)
class PoolRecords:
    """A disaggregated run: each instance's own records, and per request where it went
    and what its KV transfer cost (arrays indexed by request id)."""

    prefill: list[ServingRecords]
    decode: list[ServingRecords]
    prefill_instance: np.ndarray
    decode_instance: np.ndarray
    """-1 where the request never reached decode (rejected, one output token, unfinished
    prefill)."""
    transfer_bytes: np.ndarray
    """Bytes each source device sent (0 where nothing was sent)."""
    transfer_s: np.ndarray
    """Seconds its KV transfer took (NaN where none ran)."""
    delivered_s: np.ndarray
    """When its KV landed at the decode rank, i.e. its first token reached the user (a
    one-token request: its prefill's end; NaN if never)."""
    rejected: np.ndarray
    prefix_hit_tokens: np.ndarray
    """Prompt tokens each request found in the prefix cache (not prefilled)."""
    end_s: float
    sim_events: int
    systems: tuple[System, System]
    """The prefill and the decode instance's systems."""


class _Picker:
    """Chooses (instance, rank) of a pool for each request: in turn or least loaded."""

    def __init__(self, servers: list[_Server], least_loaded: bool) -> None:
        self.load = [np.zeros(s.dp) for s in servers]
        self.least = least_loaded
        self.turn = 0
        self.slots = [(i, r) for r in range(servers[0].dp) for i in range(len(servers))]

    def pick(self, work: float) -> tuple[int, int]:
        if self.least:
            totals = [float(x.sum()) for x in self.load]
            i = int(np.argmin(totals))
            r = int(np.argmin(self.load[i]))
        else:  # instance fastest, so consecutive requests land on different instances
            i, r = self.slots[self.turn % len(self.slots)]
            self.turn += 1
        self.load[i][r] += work
        return i, r

    def done(self, i: int, r: int, work: float) -> None:
        self.load[i][r] -= work


class _Pools:
    """The environment, the instances and the coupling between them."""

    def __init__(
        self,
        full: PathTable,
        prefill: PoolSpec,
        decode: PoolSpec,
        route: str,
        prefix_hit_fraction: float = 0.0,
    ) -> None:
        self.paths = full
        self.spec = {"prefill": prefill, "decode": decode}
        s = prefill.system.scenario
        assert isinstance(s.workload, ServingWorkload)
        t, prompt, output = arrival_times(s.workload, s.seed)
        self.t, self.prompt, self.output = t, prompt, output
        self.hit = np.minimum(np.floor(prefix_hit_fraction * prompt), prompt - 1).astype(np.int64)
        """Prompt tokens found in the prefix cache (not computed by the prefill)."""
        self.n = n = len(t)
        self.env = simpy.Environment()
        least = route == "least_loaded"
        ones = np.ones(n, dtype=np.int64)
        self.prefill = self._instances(prefill, (t, prompt, ones))
        self.decode = self._instances(decode, (t, prompt, output))
        self.pick_p = _Picker(self.prefill, least)
        self.pick_d = _Picker(self.decode, least)
        for srv in self.prefill:
            srv.on_done = self._prefilled
        for srv in self.decode:
            srv.on_done = self._decoded
        self.where_p = np.full((n, 2), -1, dtype=np.int64)
        self.where_d = np.full((n, 2), -1, dtype=np.int64)
        self.rejected = np.zeros(n, dtype=bool)
        self.xfer_bytes = np.zeros(n, dtype=np.int64)
        self.xfer_s = np.full(n, np.nan)
        self.delivered = np.full(n, np.nan)
        m = s.model
        self.model = m
        self.routes: dict[tuple[int, int, int, int], Any] = {}

    def _instances(
        self, spec: PoolSpec, req: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> list[_Server]:
        sys = spec.system
        cost: MoELayerCost = simulated_layer_cost(sys)  # shared by the pool's instances
        out = []
        dp = sys.scenario.parallelism.dp
        for _ in range(spec.instances):
            hooks = dual_batch_hooks(sys) if spec.micro_batches == 2 else HealthyServing(dp)
            srv = _Server(sys, cost, hooks, self.env, req)
            for r in srv.ranks:
                r.finished = []
            out.append(srv)
        return out

    # ------------------------------------------------------------------ processes

    def arrivals(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        p_blocks = self.prefill[0].kv_blocks
        d_blocks = self.decode[0].kv_blocks
        rank_p = self.prefill[0].ranks[0]
        rank_d = self.decode[0].ranks[0]
        for rid, t in enumerate(self.t.tolist()):
            if t > env.now:
                yield env.timeout(t - env.now)
            p, o = int(self.prompt[rid]), int(self.output[rid])
            if rank_p.blocks_for(p + 1) > p_blocks or rank_d.blocks_for(p + o) > d_blocks:
                self.rejected[rid] = True
                continue
            i, r = self.pick_p.pick(p - int(self.hit[rid]))
            self.where_p[rid] = (i, r)
            srv = self.prefill[i]
            srv.state.computed[rid] = int(self.hit[rid])  # its cached prefix: KV loaded
            srv.rank_of[rid] = r
            srv.ranks[r].waiting.append(rid)
            _wake(srv)
        for srv in self.prefill:
            srv.arrivals_done = True
            _wake(srv)

    def _prefilled(self, srv: _Server, t: float) -> None:
        """After a prefill iteration: send each finished request's KV to its decode rank."""
        for rank in srv.ranks:
            done = rank.finished
            if not done:
                continue
            assert done is not None
            for rid in done:
                self._hand_on(rid, t)
            done.clear()

    def _hand_on(self, rid: int, t: float) -> None:
        pi, pr = self.where_p[rid]
        p = int(self.prompt[rid])
        self.pick_p.done(int(pi), int(pr), p - int(self.hit[rid]))
        if self.output[rid] <= 1:  # its one token came from the prefill: done
            self.delivered[rid] = t
            return
        di, dr = self.pick_d.pick(1.0)
        self.where_d[rid] = (di, dr)
        key = (int(pi), int(pr), di, dr)
        route = self.routes.get(key)
        if route is None:
            src = self.spec["prefill"].rank_devices(int(pi), int(pr))
            dst = self.spec["decode"].rank_devices(di, dr)
            route = self.routes[key] = kv_route(self.paths, src, dst)
        tp = self.spec["decode"].system.scenario.parallelism.tp  # each decode shard's size
        nbytes = kv_transfer_bytes(self.model, p, tp)
        dt = route.time_s(nbytes)
        self.xfer_bytes[rid], self.xfer_s[rid] = nbytes, dt
        ev = self.env.timeout(t + dt - self.env.now)  # t: the prefill loop's time (>= now)
        ev.callbacks.append(partial(self._deliver, rid))

    def _deliver(self, rid: int, _event: simpy.Event) -> None:
        """The KV landed: the request joins its decode rank's queue, prompt computed and
        its first token generated."""
        di, dr = (int(x) for x in self.where_d[rid])
        srv = self.decode[di]
        st = srv.state
        now = self.env.now
        st.computed[rid] = int(self.prompt[rid])
        st.generated[rid] = 1
        st.first_token_s[rid] = now
        self.delivered[rid] = now
        srv.rank_of[rid] = dr
        srv.ranks[dr].waiting.append(rid)
        _wake(srv)

    def _decoded(self, srv: _Server, t: float) -> None:
        i = self.decode.index(srv)
        for r, rank in enumerate(srv.ranks):
            done = rank.finished
            if done:
                for _ in done:
                    self.pick_d.done(i, r, 1.0)
                done.clear()

    def run(self) -> PoolRecords:
        env = self.env
        w = self.spec["prefill"].system.scenario.workload
        assert isinstance(w, ServingWorkload)
        cap = DRAIN_CAP * w.duration_s
        env.process(self.arrivals())
        for srv in self.prefill + self.decode:
            env.process(srv.serve(cap))
        events = 0
        while env.peek() != float("inf"):
            env.step()
            events += 1
        servers = self.prefill + self.decode
        events += sum(s.folded - s.catch_ups for s in servers)
        recs = [s._records(0) for s in servers]
        k = len(self.prefill)
        return PoolRecords(
            prefill=recs[:k],
            decode=recs[k:],
            prefill_instance=self.where_p[:, 0].copy(),
            decode_instance=self.where_d[:, 0].copy(),
            transfer_bytes=self.xfer_bytes,
            transfer_s=self.xfer_s,
            delivered_s=self.delivered,
            rejected=self.rejected,
            prefix_hit_tokens=self.hit,
            end_s=float(env.now),
            sim_events=events,
            systems=(self.spec["prefill"].system, self.spec["decode"].system),
        )


def _wake(srv: _Server) -> None:
    if srv.wake is not None and not srv.wake.triggered:
        srv.wake.succeed()


def simulate_pools(
    full: PathTable,
    prefill: PoolSpec,
    decode: PoolSpec,
    route: str,
    prefix_hit_fraction: float = 0.0,
) -> PoolRecords:
    """Run a disaggregated serving scenario: ``full`` is the whole cluster's path table
    (for the KV transfers), ``prefill`` and ``decode`` the pools; ``prefix_hit_fraction``
    of every prompt is found in the prefix cache (its first tokens, not prefilled)."""
    return _Pools(full, prefill, decode, route, prefix_hit_fraction).run()
