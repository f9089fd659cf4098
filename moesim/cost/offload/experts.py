"""Serving with offloaded experts: per-device HBM expert caches (static / LRU / LFU) over host
DRAM and NVMe, the experts each iteration touches, copies overlapped with compute and
prefetch, and the stall each iteration pays (``NoOffload`` when nothing is offloaded)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from moesim import rng
from moesim.config.offload import ExpertOffloadConfig
from moesim.cost.iteration import IterationTime
from moesim.derived.serving_memory import ServingMemory, devices_per_host, serving_memory
from moesim.routing.distributions import layer_popularities, popularity_at
from moesim.system import System
from moesim.units import GB, GIB

if TYPE_CHECKING:
    pass

from moesim.cost.offload.tiers import tier_rates

EXACT_TOKENS = 128
"""Tokens per block sampled exactly (Gumbel-top-k) before the tail estimate takes over."""


def touched_experts(
    gen: np.random.Generator, p: np.ndarray, tokens: int, top_k: int, layers: int
) -> np.ndarray:
    """Which experts ``tokens`` tokens choosing ``top_k`` each touch, per layer (bool,
    layers x experts).

    The first :data:`EXACT_TOKENS` tokens of a block are sampled exactly (Gumbel-top-k, in
    doubling chunks, stopping once every expert is touched). For the rest, an expert still
    untouched is a rare one, chosen by a token with probability ``p_e x sum_j E[1 / (1 -
    R_j)]`` (``R_j``: popularity of the token's first ``j`` choices, averaged over the
    sampled tokens; exact as ``p_e -> 0``), so it is touched by the remaining ``n`` tokens
    with probability ``1 - (1 - pi_e)^n``, drawn independently per expert.
    """
    experts = p.shape[-1]
    out = np.zeros((layers, experts), dtype=bool)
    k = min(top_k, experts)
    if tokens <= 0 or layers <= 0:
        return out
    if k == experts:
        out[:] = True
        return out
    # one popularity for every layer, or one row per layer
    pl = np.broadcast_to(p.astype(np.float64), (layers, experts))
    todo = np.arange(layers)
    done = 0
    exact = min(tokens, EXACT_TOKENS)
    chunk = min(exact, max(8, 2 * experts // k))
    boost: list[float] = []
    while done < exact and todo.size:
        n = min(chunk, exact - done)
        e = gen.standard_exponential((todo.size, n, experts))
        pt = pl[todo][:, None, :]
        w = pt / np.maximum(e, np.finfo(float).tiny)
        top = np.argpartition(-w, k - 1, axis=2)[:, :, :k]
        if tokens > exact:  # removed mass before each slot, in choice order
            order = np.argsort(-np.take_along_axis(w, top, axis=2), axis=2)
            ranked = np.take_along_axis(top, order, axis=2)
            chosen = np.take_along_axis(np.broadcast_to(pt, w.shape), ranked, axis=2)
            removed = np.cumsum(chosen, axis=2) - chosen
            boost.append(float((1.0 / np.maximum(1.0 - removed, 1e-12)).sum(axis=2).mean()))
        flat = top.reshape(todo.size, -1)
        rows = np.repeat(np.arange(todo.size), n * k)
        mask = np.zeros((todo.size, experts), dtype=bool)
        mask[rows, flat.ravel()] = True
        out[todo] |= mask
        done += n
        todo = todo[~out[todo].all(axis=1)]
        chunk *= 2
    if tokens > exact and todo.size:
        factor = float(np.mean(boost)) if boost else float(k)
        pi = np.minimum(1.0, pl[todo] * factor)
        hit = 1.0 - (1.0 - pi) ** (tokens - exact)
        draw = gen.random((todo.size, experts)) < hit
        out[todo] |= draw
    return out


def touched_by(routed: np.ndarray, layers: int, experts: int) -> np.ndarray:
    """Which experts the given tokens' choices touch per layer (bool, layers x experts):
    ``routed`` int [tokens, layers, top_k]."""
    out = np.zeros((layers, experts), dtype=bool)
    if routed.size:
        rows = np.broadcast_to(np.arange(layers)[None, :, None], routed.shape)
        out[rows.ravel(), routed.ravel()] = True
    return out


class Tier:
    """One cache level of one device: pinned keys plus an LRU or LFU managed part."""

    def __init__(
        self, policy: str, capacity: int, pinned: list[int], warm: list[int] | None = None
    ) -> None:
        self.policy = policy
        self.pinned = frozenset(pinned)
        self.capacity = max(0, capacity - len(self.pinned))
        """Slots of the managed (non-pinned) part."""
        self.managed: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}
        # start-up: the server loads weights hottest first until the tier is full; the
        # coldest of them is the first to go
        fill = [k for k in (warm or []) if k not in self.pinned][: self.capacity]
        for k in reversed(fill):
            self.managed[k] = None

    def __contains__(self, key: int) -> bool:
        return key in self.pinned or key in self.managed

    def touch(self, key: int) -> None:
        """Record a use of ``key`` (recency and frequency)."""
        self.freq[key] = self.freq.get(key, 0) + 1
        if key in self.managed:
            self.managed.move_to_end(key)

    def admit(self, key: int, protect: set[int]) -> bool:
        """Bring ``key`` in, evicting by the policy (sparing ``protect`` if possible); False
        when it does not stay (static, no managed slot, or an LFU newcomer used no more
        often than the victim: it then passes through a staging buffer)."""
        if key in self:
            return True
        if self.capacity <= 0:
            return False
        if len(self.managed) >= self.capacity:
            victim = self._victim(protect)
            if self.policy == "lfu" and self.freq.get(key, 0) <= self.freq.get(victim, 0):
                return False
            self.managed.pop(victim)
        self.managed[key] = None
        return True

    def _victim(self, protect: set[int]) -> int:
        keys = [k for k in self.managed if k not in protect] or list(self.managed)
        if self.policy == "lfu":  # least frequent; the order of ``keys`` breaks ties by recency
            return min(keys, key=lambda k: self.freq.get(k, 0))
        return keys[0]


class Partitioned:
    """A tier of one device split evenly over the MoE blocks (``slots // blocks`` each, the
    first ``slots % blocks`` blocks one more), each block's part a :class:`Tier` of its
    experts; ``static`` pins each block's hottest experts in its part."""

    def __init__(self, policy: str, slots: int, blocks: int, experts: int, hot: list[list[int]]):
        """``hot[j]``: block ``j``'s experts (of this device), hottest first."""
        self.experts = experts
        self.parts: list[Tier] = []
        for j in range(blocks):
            n = slots // blocks + (1 if j < slots % blocks else 0)
            order = [j * experts + e for e in hot[j]]
            self.parts.append(Tier(policy, n, order[:n] if policy == "static" else [], order))

    def __contains__(self, key: int) -> bool:
        return key in self.parts[key // self.experts]

    def touch(self, key: int) -> None:
        self.parts[key // self.experts].touch(key)

    def admit(self, key: int, protect: set[int]) -> bool:
        return self.parts[key // self.experts].admit(key, protect)


@dataclass
class OffloadTotals:
    """What expert offloading did over a run (device sums over the simulated EP group)."""

    accesses: int = 0
    """Expert uses (one expert of one layer on one device in one iteration)."""
    hbm_hits: int = 0
    """Uses whose expert was in HBM when the layer's MoE part started (resident, or
    prefetched and landed)."""
    late_prefetch: int = 0
    """Uses whose expert's prefetch was still being copied when the layer needed it (they
    wait for it: neither an HBM hit nor a demand copy)."""
    dram_hits: int = 0
    """Misses in HBM served from host DRAM."""
    nvme_reads: int = 0
    """Misses in HBM and DRAM served from NVMe."""
    prefetch_copies: int = 0
    prefetch_useful: int = 0
    """Prefetched experts that the predicted layer then used (landed in time or late)."""
    prefetch_on_time: int = 0
    """Those of them that had landed when the layer needed them (counted in ``hbm_hits``)."""
    bytes_moved: float = 0.0
    """Bytes copied into HBM, demand and prefetch."""
    bytes_from_nvme: float = 0.0
    wasted_prefetch_bytes: float = 0.0
    """Bytes of prefetched experts the predicted layer did not use."""
    stall_s: list[float] = field(default_factory=list)
    """Stall added to each iteration, seconds."""


class ExpertOffload:
    """The HBM expert caches of one EP group and their copy timelines, one iteration at a
    time (see the module docstring)."""

    def __init__(self, system: System, cfg: ExpertOffloadConfig) -> None:
        s = system.scenario
        m, p = s.model, s.parallelism
        self.cfg = cfg
        self.routing = s.routing
        self.top_k = m.top_k
        self.experts = m.experts
        self.edp = system.layout.edp
        self.moe_layers = tuple(m.moe_layer_indices)
        self.layers = m.layers
        self.mem: ServingMemory = serving_memory(m, p, s.cluster.accelerator, cfg)
        self.expert_bytes = float(self.mem.expert_bytes)
        self.rates = tier_rates(s, cfg.host_memory)
        # each MoE block's popularity (all alike unless routing.layers is independent)
        self.base = layer_popularities(
            s.routing, m.experts, len(m.moe_layer_indices), rng.stream(s.seed, "popularity")
        )
        self.gen = rng.stream(s.seed, "offload", 0)
        self.guess = rng.stream(s.seed, "offload", 1)
        n_moe = len(self.moe_layers)
        self.owned = [system.layout.local_experts(r) for r in range(p.ep)]
        slots = self.mem.cache_experts or 0
        hot = np.argsort(-self.base, axis=1, kind="stable")  # per block, hottest first
        per_device_dram = (
            None if cfg.dram_gib is None else cfg.dram_gib * GIB / devices_per_host(s.cluster)
        )
        dram_slots = (
            None if per_device_dram is None else int(per_device_dram // max(1.0, self.expert_bytes))
        )
        self.hbm: list[Partitioned] = []
        self.dram: list[Partitioned | None] = []
        for r in range(p.ep):
            own = set(self.owned[r].tolist())
            mine = [[int(e) for e in row if int(e) in own] for row in hot]
            self.hbm.append(Partitioned(cfg.policy, slots, n_moe, m.experts, mine))
            self.dram.append(
                None
                if dram_slots is None
                else Partitioned(cfg.policy, dram_slots, n_moe, m.experts, mine)
            )
        self.totals = OffloadTotals()

    def copy_s(self, nvme: bool) -> float:
        """Time to copy one expert into HBM from DRAM or NVMe."""
        bps = self.rates.nvme_bps if nvme else self.rates.dram_bps
        return self.rates.latency_s + self.expert_bytes / bps

    def step(
        self,
        now_s: float,
        tokens: int,
        attention_s: float,
        moe_s: float,
        dense_s: float,
        routed: np.ndarray | None = None,
    ) -> float:
        """The stall of one iteration starting at ``now_s`` over ``tokens`` tokens (all DP
        ranks), whose per-layer times are ``attention_s`` (one block's attention),
        ``moe_s`` (one MoE block) and ``dense_s`` (one dense FFN block). ``routed``
        (int [tokens, moe_layers, top_k], from a trace or logits feed) gives the
        iteration's real choices: the simulated group's tokens (its first
        ``ceil(tokens / edp)``) touch exactly their experts."""
        t = self.totals
        n_moe = len(self.moe_layers)
        per_group = math.ceil(tokens / self.edp)
        if routed is not None:
            used = touched_by(routed[:per_group], n_moe, self.experts)
        else:
            p = popularity_at(self.routing, self.base, now_s)
            used = touched_experts(self.gen, p, per_group, self.top_k, n_moe)
        moe_set = set(self.moe_layers)
        cfg, pre = self.cfg, self.cfg.prefetch
        E = self.experts
        free = [0.0] * len(self.hbm)
        ready: list[dict[int, float]] = [{} for _ in self.hbm]
        fetched: list[set[int]] = [set() for _ in self.hbm]
        u = (
            self.guess.random((2, len(self.hbm), n_moe, len(self.owned[0])))
            if pre is not None
            else np.empty((2, len(self.hbm), n_moe, 0))
        )
        if pre is not None and n_moe:  # the first block's experts load during attention
            for d in range(len(self.hbm)):
                mine = self.owned[d]
                self._prefetch(d, 0, used[0, mine], 0.0, free, ready, fetched, set(), u[:, d, 0])
        c = 0.0
        stall = 0.0
        j = 0
        for i in range(self.layers):
            c += attention_s
            if i not in moe_set:
                c += dense_s
                continue
            end = c + moe_s
            for d, hbm in enumerate(self.hbm):
                mine = self.owned[d]
                keys = [j * E + int(e) for e in mine[used[j, mine]]]
                protect = set(keys)
                times = []
                for key in keys:
                    t.accesses += 1
                    hbm.touch(key)
                    if key in fetched[d]:
                        t.prefetch_useful += 1
                    if key in hbm or key in ready[d]:
                        at = max(c, ready[d].get(key, c))
                        if at > c:  # its prefetch is still being copied: it waits
                            t.late_prefetch += 1
                        else:
                            t.hbm_hits += 1
                            t.prefetch_on_time += int(key in fetched[d])
                        times.append(at)
                    else:
                        dram = self.dram[d]
                        nvme = dram is not None and key not in dram
                        if dram is not None:
                            dram.touch(key)
                        if nvme:
                            t.nvme_reads += 1
                            t.bytes_from_nvme += self.expert_bytes
                            assert dram is not None
                            dram.admit(key, set())
                        else:
                            t.dram_hits += 1
                        start = max(c, free[d])
                        free[d] = start + self.copy_s(nvme)
                        t.bytes_moved += self.expert_bytes
                        times.append(free[d])
                        hbm.admit(key, protect)
                t.wasted_prefetch_bytes += len(fetched[d] - protect) * self.expert_bytes
                fetched[d] = set()
                if keys and max(times) > c:
                    share = moe_s / len(keys)
                    if cfg.overlap:
                        f = c
                        for r in sorted(times):
                            f = max(f, r) + share
                    else:
                        f = max(c, max(times)) + moe_s
                    end = max(end, f)
                if pre is not None and j + 1 < n_moe:
                    self._prefetch(
                        d,
                        j + 1,
                        used[j + 1, mine],
                        c,
                        free,
                        ready,
                        fetched,
                        protect,
                        u[:, d, j + 1],
                    )
            stall += end - (c + moe_s)
            c = end
            j += 1
        t.stall_s.append(stall)
        return stall

    @property
    def records(self) -> ExpertOffload:
        """What a serving run's records keep: the caches and their totals (this object)."""
        return self

    def stall_for(
        self, now_s: float, tokens: int, it: IterationTime, routed: np.ndarray | None = None
    ) -> float:
        """:meth:`step` with the per-layer times of a costed serving iteration."""
        n_moe = len(self.moe_layers)
        n_dense = self.layers - n_moe
        return self.step(
            now_s,
            tokens,
            it.attention_s / self.layers,
            it.moe_s / n_moe if n_moe else 0.0,
            it.dense_s / n_dense if n_dense else 0.0,
            routed,
        )

    def _prefetch(
        self,
        d: int,
        nxt: int,
        will_use: np.ndarray,
        c: float,
        free: list[float],
        ready: list[dict[int, float]],
        fetched: list[set[int]],
        protect: set[int],
        u: np.ndarray,
    ) -> None:
        """Queue copies of device ``d``'s predicted experts of MoE block ``nxt``; ``u``
        holds two rows of uniform draws (which right guesses, which wrong ones)."""
        pre = self.cfg.prefetch
        assert pre is not None
        mine = self.owned[d]
        actual = mine[will_use]
        others = mine[~will_use]
        right = actual[u[0, : actual.size] < pre.accuracy]
        wrong_n = min(actual.size - right.size, others.size)
        wrong = others[np.argsort(u[1, : others.size], kind="stable")[:wrong_n]]
        hbm, dram = self.hbm[d], self.dram[d]
        keys = [nxt * self.experts + int(e) for e in np.concatenate([right, wrong])]
        keep = protect | set(keys)
        for key in keys:
            if key in ready[d]:
                continue
            if key in hbm:  # resident: held for the next block like a staged copy
                ready[d][key] = c
                continue
            nvme = dram is not None and key not in dram
            if dram is not None:  # the DRAM tier sees the reads it serves
                dram.touch(key)
            if nvme:
                assert dram is not None
                self.totals.bytes_from_nvme += self.expert_bytes
                dram.admit(key, set())
            start = max(c, free[d])
            free[d] = start + self.copy_s(nvme)
            ready[d][key] = free[d]
            fetched[d].add(key)
            self.totals.prefetch_copies += 1
            self.totals.bytes_moved += self.expert_bytes
            hbm.admit(key, keep)

    def summary(self, iteration_s: np.ndarray) -> dict[str, object]:
        """The ``offload`` section of a serving summary; ``iteration_s`` are the
        iterations' durations including their stalls."""
        t = self.totals
        stall = np.asarray(t.stall_s, dtype=float)
        n = max(1, t.accesses)
        busy = float(iteration_s.sum())
        r = self.rates
        return {
            "policy": self.cfg.policy,
            "cache_experts_per_device": self.mem.cache_experts,
            "device_experts": self.mem.device_experts,
            "expert_mib": round(self.expert_bytes / 2**20, 3),
            "prefetch_accuracy": None if self.cfg.prefetch is None else self.cfg.prefetch.accuracy,
            "copy_gbps": {"dram": round(r.dram_bps / GB, 3), "nvme": round(r.nvme_bps / GB, 3)},
            "accesses": t.accesses,
            "hit_rate": {
                "hbm": round(t.hbm_hits / n, 6),
                "in_flight": round(t.late_prefetch / n, 6),
                "dram": round(t.dram_hits / n, 6),
                "nvme": round(t.nvme_reads / n, 6),
            },
            "prefetched_share": round(t.prefetch_on_time / n, 6),
            "prefetch_copies": t.prefetch_copies,
            "prefetch_useful": t.prefetch_useful,
            "prefetch_late": t.late_prefetch,
            "bytes_moved_gib": round(t.bytes_moved / GIB, 6),
            "bytes_from_nvme_gib": round(t.bytes_from_nvme / GIB, 6),
            "wasted_prefetch_gib": round(t.wasted_prefetch_bytes / GIB, 6),
            "stall_s": round(float(stall.sum()), 6),
            "stall_share": round(float(stall.sum()) / busy, 6) if busy > 0 else 0.0,
            "stall_per_iteration_ms": {
                "mean": round(float(stall.mean()) * 1e3, 6) if stall.size else 0.0,
                "p99": round(float(np.percentile(stall, 99)) * 1e3, 6) if stall.size else 0.0,
            },
        }


class NoOffload:
    """Every expert stays in HBM: nothing is copied, no iteration stalls (the serving
    loop's no-op in place of an :class:`ExpertOffload`)."""

    records: None = None
    """Nothing for a serving run's records."""

    def stall_for(
        self, now_s: float, tokens: int, it: IterationTime, routed: np.ndarray | None = None
    ) -> float:
        return 0.0


def expert_offload(system: System) -> ExpertOffload | NoOffload:
    """The scenario's expert offloading: its caches, or :class:`NoOffload` when every
    expert stays in HBM."""
    cfg = system.scenario.policies.offload.experts
    return NoOffload() if cfg is None else ExpertOffload(system, cfg)


# --- training: streamed experts and ZeRO-Offload ------------------------------------
