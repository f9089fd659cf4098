"""The ``serving`` workload: requests arrive, DP ranks batch them, iterations run in SimPy.

Mapping onto the layout (see :mod:`moesim.cost.iteration`): the server is ``dp``
data-parallel attention ranks (each a TP group of ``tp`` devices with its own scheduler
and KV cache) sharing expert-parallel MoE layers. Requests are spread round-robin over
the DP ranks in arrival order (vLLM's DP front-end balances load; round-robin is its
simplest form). All ranks step together, one iteration at a time, because every MoE
layer's all-to-all couples them.

SimPy holds two processes: arrivals (one event per request) and the server (one event
per iteration, or a wake-up when it idles). Nothing is simulated per token. Fast paths
that change no figure (issue 15; ``tests/test_steady_decode.py``): an iteration that ends
before the next arrival is finished in place, without the event queue (:meth:`_Server.serve`),
and a rank whose running requests all decode serves them in closed form until one
finishes or a request arrives (:mod:`moesim.engine.batching`, steady decode runs).

Randomness: arrival times from the stream ``"arrivals"``, prompt lengths from
``("lengths", 0)`` and output lengths from ``("lengths", 1)``, so changing one
distribution never shifts another's draws, and a higher Poisson rate with the same seed
gives the same requests, arriving proportionally earlier.

The run lasts until every arrived request has finished, or until ``10 x duration_s``
(then the rest count as unfinished). A request whose prompt and output cannot fit the
rank's whole KV cache is rejected on arrival, as vLLM rejects prompts longer than its
cache.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from moesim import rng
from moesim.config.serving import (
    ConstantLength,
    GammaArrival,
    LengthConfig,
    PoissonArrival,
    ServingWorkload,
    TraceArrival,
    UniformLength,
)
from moesim.cost.iteration import IterationCost
from moesim.cost.layer_cost import MoELayerCost
from moesim.cost.offload import ExpertOffload, expert_offload
from moesim.cost.routed_layers import routed_layer_cost
from moesim.derived.serving_memory import serving_memory
from moesim.engine.batching import RankScheduler, RequestState
from moesim.engine.iteration_log import IterationLog
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.engine.progress import current as current_progress
from moesim.engine.prompt_shapes import prompt_shapes
from moesim.engine.serving_hooks import HealthyServing, ServingHooks
from moesim.engine.speculative import SpeculativeScheduler, draft_load, with_draft
from moesim.routing.replay import RoutingUse, routing_feed
from moesim.system import System

DRAIN_CAP = 10.0
"""The run stops at ``DRAIN_CAP x duration_s`` even if requests are still unfinished."""


@dataclass(frozen=True)
class RequestRecords:
    """One row per request (arrays indexed by request id, in arrival order)."""

    arrival_s: np.ndarray
    rank: np.ndarray
    """Data-parallel rank that served it."""
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    first_scheduled_s: np.ndarray
    """When it first entered a batch (NaN if never); queue time = this - arrival."""
    first_token_s: np.ndarray
    """End of the iteration that sampled its first token (NaN if never)."""
    finish_s: np.ndarray
    """End of the iteration that sampled its last token (NaN if unfinished)."""
    generated_tokens: np.ndarray
    preemptions: np.ndarray
    recomputed_tokens: np.ndarray
    """Tokens whose KV was dropped by preemptions and computed again."""
    rejected: np.ndarray
    """Whether it could never fit the KV cache and was turned away on arrival."""


@dataclass(frozen=True)
class IterationRecords:
    """One row per iteration (arrays)."""

    start_s: np.ndarray
    duration_s: np.ndarray
    batch_tokens: np.ndarray
    """Tokens processed, summed over DP ranks."""
    prefill_tokens: np.ndarray
    """Of which prompt (or recomputed) tokens, i.e. not one-token decodes."""
    running_seqs: np.ndarray
    """Requests in the batch, summed over DP ranks."""
    sampled_tokens: np.ndarray
    """Tokens produced (one per request that completed its pending tokens)."""
    kv_blocks_used: np.ndarray
    """KV blocks held by each DP rank during the iteration (iterations x dp)."""
    attention_s: np.ndarray
    moe_s: np.ndarray
    dense_s: np.ndarray
    head_s: np.ndarray
    dropped_fraction: np.ndarray
    """Expected share of MoE token-choice slots dropped by capacity."""
    moe_comm_s: np.ndarray
    """Of ``moe_s``, the all-to-all part (dispatch + combine on the critical path)."""
    host_s: np.ndarray
    """The engine's host-side time not hidden under the device's."""


@dataclass(frozen=True)
class ServingRecords:
    """Everything a serving run produced; reports are computed from this."""

    requests: RequestRecords
    iterations: IterationRecords
    dp: int
    kv_blocks_per_rank: int
    block_tokens: int
    end_s: float
    """Simulated time when the run stopped."""
    drained: bool
    """Whether every arrived request finished before the cap."""
    sim_events: int
    """SimPy events of the run, each iteration counted as one event (also one finished in
    place between two events)."""
    moe_evaluations: int
    """Distinct batch sizes the MoE layer cost was simulated at."""
    offload: ExpertOffload | None = None
    """The expert caches and their totals when experts are offloaded (``iterations``'
    durations include the stalls)."""
    failures: Any = None
    """What the serving hooks recorded: with failures, a
    :class:`moesim.failures.serving.ServingFailureRecords` (failure events, the state of
    each iteration and the requests moved or lost); None without. Typed loosely because
    the engine sits below the failures package."""
    moe_link_bytes: np.ndarray | None = None
    """Bytes each topology edge carried in the MoE all-to-alls of the whole run (every
    iteration's MoE layers at its batch size, the healthy system's expected traffic)."""
    routed: RoutingUse | None = None
    """What a trace or logits routing handed out, every iteration's tokens in order
    (None for popularity sampling)."""


def sample_lengths(dist: LengthConfig, n: int, gen: np.random.Generator) -> np.ndarray:
    """``n`` lengths from ``dist``: drawn, rounded to whole tokens, clamped to [min, max]."""
    if isinstance(dist, ConstantLength):
        raw = np.full(n, float(dist.value))
    elif isinstance(dist, UniformLength):
        raw = gen.integers(dist.low, dist.high, size=n, endpoint=True).astype(float)
    else:
        raw = gen.lognormal(dist.mu, dist.sigma, size=n)
    hi = dist.max if dist.max is not None else np.inf
    return np.clip(np.rint(raw), dist.min, hi).astype(np.int64)


def arrival_times(w: ServingWorkload, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival time, prompt and output length of every request arriving in [0, duration)."""
    a = w.arrival
    if isinstance(a, TraceArrival):
        t = np.asarray(a.arrival_s, dtype=float)
        keep = t < w.duration_s
        return (
            t[keep],
            np.asarray(a.prompt_tokens, dtype=np.int64)[keep],
            np.asarray(a.output_tokens, dtype=np.int64)[keep],
        )
    gen = rng.stream(seed, "arrivals")
    expected = w.duration_s * a.rate_per_s
    chunk = int(expected + 6 * np.sqrt(expected) + 16)
    gaps: list[np.ndarray] = []
    total = 0.0
    while total < w.duration_s:
        if isinstance(a, PoissonArrival):
            g = gen.exponential(1.0 / a.rate_per_s, size=chunk)
        else:
            assert isinstance(a, GammaArrival)
            g = gen.gamma(1.0 / a.cv**2, a.cv**2 / a.rate_per_s, size=chunk)
        gaps.append(g)
        total += float(g.sum())
    t = np.cumsum(np.concatenate(gaps))
    t = t[t < w.duration_s]
    assert w.prompt_tokens is not None and w.output_tokens is not None
    prompt = sample_lengths(w.prompt_tokens, len(t), rng.stream(seed, "lengths", 0))
    output = sample_lengths(w.output_tokens, len(t), rng.stream(seed, "lengths", 1))
    return t, prompt, output


def lagged_times(
    times: np.ndarray, start_s: np.ndarray, duration_s: np.ndarray, lag: int
) -> np.ndarray:
    """Token times moved ``lag`` iterations later (an engine whose host reads a step's
    tokens only after launching the next steps; ``EngineConfig.output_lag_iterations``).

    Each finite time in ``times`` is the end of the iteration that computed the token
    (``start_s + duration_s`` of that row, bit for bit). It becomes the end of the
    iteration ``lag`` rows later when each of those follows its predecessor without a gap;
    where the engine idled instead (no next iteration at once), the lagged iteration is
    taken to last as long as the one before it (the engine re-runs the requests it does
    not yet know have finished)."""
    out = np.array(times, dtype=float)
    if lag <= 0 or not len(start_s):
        return out
    ends = start_s + duration_s
    ok = np.isfinite(out)
    idx = np.searchsorted(ends, out[ok])
    if np.any(idx >= len(ends)) or np.any(ends[np.minimum(idx, len(ends) - 1)] != out[ok]):
        raise ValueError("a token time is not the end of an iteration")  # pragma: no cover
    t = ends[idx]
    last = duration_s[idx]
    for _ in range(lag):
        nxt = idx + 1
        chained = nxt < len(ends)
        chained[chained] = start_s[nxt[chained]] == t[chained]
        t = np.where(chained, ends[np.minimum(nxt, len(ends) - 1)], t + last)
        last = np.where(chained, duration_s[np.minimum(nxt, len(ends) - 1)], last)
        idx = np.where(chained, nxt, len(ends))  # once idle, stay off the record
    out[ok] = t
    return out


class _Server:
    """The SimPy side: arrivals feed the ranks' queues; the server loop runs iterations."""

    def __init__(
        self,
        system: System,
        moe_cost: MoELayerCost | None,
        hooks: ServingHooks,
        env: simpy.Environment | None = None,
        requests: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """``env`` and ``requests`` (arrival, prompt, output) are given when the server is
        one instance of a prefill or decode pool (:mod:`moesim.engine.pools`), fed from
        outside; by default it has its own environment and draws its own requests."""
        self.system = system
        s = system.scenario
        w = s.workload
        assert isinstance(w, ServingWorkload)
        self.w = w
        self.dp = s.parallelism.dp
        p = s.policies
        mem = serving_memory(
            s.model, s.parallelism, s.cluster.accelerator, p.offload.experts, p.experts.redundant
        )
        self.hooks = hooks
        self.kv_blocks = hooks.kv_blocks(
            mem, mem.kv_blocks(w.kv_cache_fraction, w.scheduler.block_tokens)
        )
        t, prompt, output = requests if requests is not None else arrival_times(w, s.seed)
        self.state = RequestState(t.tolist(), prompt.tolist(), output.tolist())
        self.spec = w.speculative
        self.ranks = [
            # steady decode runs skip per-request work unless hooks may touch the state
            RankScheduler(
                self.state, w.scheduler, self.kv_blocks, lazy=isinstance(hooks, HealthyServing)
            )
            if self.spec is None
            else SpeculativeScheduler(self.state, w.scheduler, self.kv_blocks, self.spec, s.seed)
            for _ in range(self.dp)
        ]
        self.cost = IterationCost(
            system, moe_cost if moe_cost is not None else simulated_layer_cost(system)
        )
        self.shapes = prompt_shapes(self.cost.host, w.engine, self.dp, self.state.prompt)
        self.offload = expert_offload(system)
        self.feed = routing_feed(s)  # a trace or logits routing, consumed in order
        self.routed_cost = routed_layer_cost(system, self.cost.moe_cost, self.feed)
        self.rank_of = np.arange(len(t), dtype=np.int64) % self.dp
        self.rejected = np.zeros(len(t), dtype=bool)
        self.env = env if env is not None else simpy.Environment()
        self.on_done: Callable[[_Server, float], None] | None = None
        """Called after every iteration that finished a request (pools hand it on)."""
        self.wake: simpy.Event | None = None
        self.folded = 0
        """Iterations finished in place, between two SimPy events (see :meth:`serve`)."""
        self.catch_ups = 0
        """Timeouts that moved SimPy's clock to the loop's time after such iterations."""
        self.arrivals_done = False
        self.log = IterationLog(13, self.dp)
        """Each iteration's row and the KV blocks each rank uses (columns of numpy chunks)."""

    def arrivals(self) -> Generator[simpy.Event, Any, None]:
        env, st = self.env, self.state
        for rid, t in enumerate(st.arrival_s):
            if t > env.now:
                yield env.timeout(t - env.now)
            r = self.hooks.rank_for(rid, env.now)
            rank = self.ranks[r if r is not None else 0]
            if rank.blocks_for(st.prompt[rid] + st.output[rid]) > self.kv_blocks:
                self.rejected[rid] = True
                continue
            if r is None:  # no rank can take it now (failures): the hooks hold it
                self.hooks.hold(rid)
            else:
                self.rank_of[rid] = r
                self.ranks[r].waiting.append(rid)
            if self.wake is not None and not self.wake.triggered:
                self.wake.succeed()
        self.arrivals_done = True
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def serve(self, cap_s: float) -> Generator[simpy.Event, Any, None]:
        """The server loop. ``t`` is the loop's time: with the healthy hooks an iteration
        that ends before the next SimPy event (an arrival) is finished in place, without a
        trip through the event queue, and the loop catches SimPy's clock up to ``t`` (one
        timeout, checked to land exactly on ``t``) before anything else may happen. The
        records are those of yielding once per iteration."""
        env, ranks = self.env, self.ranks
        fold = isinstance(self.hooks, HealthyServing)
        t = env.now
        progress = current_progress()
        every = progress.every if progress is not None else 0
        iterations = 0
        while t < cap_s:
            wait = self.hooks.advance(t, self.ranks, self.state, self.rank_of)
            if wait > 0:  # no rank can run (failures): wait for a recovery
                yield from self._catch_up(t)
                if t + wait >= cap_s:
                    return
                yield env.timeout(wait)
                t = env.now
                continue
            for r in ranks:
                if r.running or r.waiting:
                    break
            else:  # no rank has work
                yield from self._catch_up(t)
                if self.arrivals_done:
                    return
                self.wake = env.event()
                yield self.wake
                t = env.now
                continue
            start = t
            batches = [r.schedule(start) for r in ranks]
            # one pass over the ranks' batches (this loop runs once per iteration)
            keys: list[float] = []
            tokens, kv_read, samples, used = [], [], [], []
            total = decodes = seqs = 0
            for r, b in zip(ranks, batches):
                tokens.append(b.tokens)
                keys.append(b.keys)
                kv_read.append(b.kv_read_tokens)
                samples.append(b.sampled)
                used.append(r.total_blocks - r.free_blocks)
                total += b.tokens
                decodes += b.decodes
                seqs += len(b.ids)
            if not total:  # pragma: no cover - would be a scheduler bug
                raise RuntimeError("the scheduler chose no work while requests were waiting")
            routed = self.feed.take(total, decodes) if self.feed is not None else None
            if routed is not None and self.routed_cost is not None:  # priced from its tokens
                self.cost.routed = (total, self.routed_cost.price(routed))
            it = self.hooks.iteration_time(self.cost, tokens, keys, kv_read, samples)
            it = self.shapes.apply(self.cost, it, batches, tokens, samples, kv_read)
            if self.spec is not None:  # the drafter's passes (workload.speculative)
                it = with_draft(self.cost, it, self.spec, *draft_load(batches))
            stall = self.offload.stall_for(start, total, it, routed)
            delay = it.total_s + stall
            t = start + delay  # where env.timeout(delay) from ``start`` lands
            now = env.now
            if fold and t < cap_s and t < env.peek() and now + (t - now) == t:
                self.folded += 1  # nothing else happens before it ends: finish it here
            else:
                yield from self._catch_up(start)
                yield env.timeout(delay)
            sampled = 0
            for r, b in zip(ranks, batches):
                sampled += r.complete(b, t)
            if self.on_done is not None:
                self.on_done(self, t)
            self.log.append(
                (
                    start,
                    delay,
                    total,
                    total - decodes,
                    seqs,
                    sampled,
                    it.attention_s,
                    it.moe_s,
                    it.dense_s,
                    it.head_s,
                    it.dropped_fraction,
                    it.moe_comm_s,
                    it.host_s,
                ),
                used,
            )
            iterations += 1
            if every and iterations % every == 0 and progress is not None:
                progress.sink(t, self.w.duration_s)

    def _catch_up(self, t: float) -> Generator[simpy.Event, Any, None]:
        """Move SimPy's clock to the loop's time ``t`` (exact: an iteration is finished in
        place only where ``now + (t - now) == t``; no event lies between)."""
        if t > self.env.now:
            self.catch_ups += 1
            yield self.env.timeout(t - self.env.now)
            assert self.env.now == t

    def run(self) -> ServingRecords:
        env = self.env
        env.process(self.arrivals())
        env.process(self.serve(DRAIN_CAP * self.w.duration_s))
        events = 0
        while env.peek() != float("inf"):
            env.step()
            events += 1
        # each iteration counts as the one event it takes when yielded
        return self._records(events + self.folded - self.catch_ups)

    def _records(self, events: int) -> ServingRecords:
        for r in self.ranks:
            r.sync()
        st = self.state
        cols, kv_used = self.log.columns()
        it = IterationRecords(
            start_s=cols[0],
            duration_s=cols[1],
            batch_tokens=cols[2].astype(np.int64),
            prefill_tokens=cols[3].astype(np.int64),
            running_seqs=cols[4].astype(np.int64),
            sampled_tokens=cols[5].astype(np.int64),
            kv_blocks_used=kv_used,
            attention_s=cols[6],
            moe_s=cols[7],
            dense_s=cols[8],
            head_s=cols[9],
            dropped_fraction=cols[10],
            moe_comm_s=cols[11],
            host_s=cols[12],
        )
        n = len(st.arrival_s)
        lag = self.w.engine.output_lag_iterations
        first, finish = (
            lagged_times(np.asarray(x, dtype=float), it.start_s, it.duration_s, lag)
            for x in (st.first_token_s, st.finish_s)
        )
        req = RequestRecords(
            arrival_s=np.asarray(st.arrival_s, dtype=float),
            rank=self.rank_of.copy(),
            prompt_tokens=np.asarray(st.prompt, dtype=np.int64),
            output_tokens=np.asarray(st.output, dtype=np.int64),
            first_scheduled_s=np.asarray(st.first_scheduled_s, dtype=float),
            first_token_s=first,
            finish_s=finish,
            generated_tokens=np.asarray(st.generated, dtype=np.int64),
            preemptions=np.asarray(st.preemptions, dtype=np.int64),
            recomputed_tokens=np.asarray(st.recomputed, dtype=np.int64),
            rejected=self.rejected.copy(),
        )
        served = ~req.rejected
        return ServingRecords(
            requests=req,
            iterations=it,
            dp=self.dp,
            kv_blocks_per_rank=self.kv_blocks,
            block_tokens=self.w.scheduler.block_tokens,
            end_s=float(self.env.now),
            drained=bool(np.all(np.isfinite(req.finish_s[served]))),
            sim_events=events,
            moe_evaluations=self.cost.moe_cost.evaluations,
            offload=self.offload.records,
            failures=self.hooks.records(n),
            moe_link_bytes=self._moe_link_bytes(it.batch_tokens),
            routed=self.feed.use if self.feed is not None else None,
        )

    def _moe_link_bytes(self, batch_tokens: np.ndarray) -> np.ndarray:
        """Expected all-to-all bytes per edge over every iteration (memoized buckets)."""
        cost = self.cost.moe_cost
        sizes, counts = np.unique(batch_tokens, return_counts=True)
        total = np.zeros(self.system.paths.bandwidth_gbps.shape[0])
        if not self.cost.n_moe:
            return total
        for size, count in zip(sizes.tolist(), counts.tolist()):
            total = total + count * cost.link_bytes(int(size))
        return np.asarray(total * self.cost.n_moe)


def simulate_serving(
    system: System, moe_cost: MoELayerCost | None = None, hooks: ServingHooks | None = None
) -> ServingRecords:
    """Run a ``serving`` scenario. ``moe_cost`` may be shared between runs of systems whose
    cluster, model, layout, routing, policies and seed agree (its memo stays valid).
    ``hooks``: what fails during the run (:mod:`moesim.engine.serving_hooks`; nothing when
    None). A scenario's ``failures`` section is played by
    :func:`moesim.failures.serving.simulate_serving_with_failures`, which builds them."""
    if hooks is None:
        hooks = HealthyServing(system.scenario.parallelism.dp)
    return _Server(system, moe_cost, hooks).run()
