"""Continuous batching with a paged KV cache, per data-parallel rank (no SimPy here).

The policy is vLLM v1's scheduler (``vllm/v1/core/sched/scheduler.py``) on the block
manager of PagedAttention (Kwon et al., SOSP 2023):

- Every request has ``num_tokens = prompt + generated`` and ``computed`` tokens (those
  with KV in the cache); an iteration computes ``num_tokens - computed`` of them (the
  whole remaining prompt, or one token per decode), and a request whose computed tokens
  reach ``num_tokens`` samples one new token.
- Running requests are served first, in order, each taking what it needs from the token
  budget (``max_batch_tokens``); a partially prefilled prompt takes what is left.
- KV lives in blocks of ``block_tokens`` tokens; a request holds
  ``ceil(computed_after_this_iteration / block_tokens)`` blocks. When a running request
  needs a block and none is free, the most recently admitted running request is
  preempted by recomputation: its blocks are freed, its computed tokens dropped, and it
  goes back to the front of the waiting queue (tokens already generated are kept and
  recomputed with the prompt when it resumes). A request may preempt itself.
- If nothing was preempted, waiting requests are admitted first-come first-served while
  budget, ``max_seqs`` and free blocks allow; the first that does not fit stops
  admission (no skipping). Without chunked prefill a prompt is admitted whole or not.

Per-request state lives in plain Python lists (fast to index one element at a time); the
engine turns it into numpy records at the end.

Steady decode runs (``RankScheduler(lazy=True)``, the serving engine's healthy runs): when
after an iteration every running request decodes, nothing waits and the running requests
fit the token budget, the next iterations are known in closed form until the first one
that finishes a request: each request computes one token after ``c + j`` cached ones at
step ``j`` (keys = KV tokens read = ``sum(c + 1) + j x running``), and a request needs a
new KV block every ``block_tokens`` steps at its own phase. The rank then returns those
batches without visiting its requests, counts the blocks from the phases, and applies
the ``j`` steps to the per-request state in one pass (:meth:`RankScheduler.sync`) when a
request arrives, the blocks run short (a preemption may follow), the horizon ends, or
the run does. Exact: the same batches, blocks and state as iteration by iteration.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from moesim.config.serving import SchedulerConfig


@dataclass
class RequestState:
    """Mutable per-request state of a run, indexed by request id (arrival order)."""

    arrival_s: list[float]
    prompt: list[int]
    output: list[int]
    computed: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    """Tokens whose KV was dropped by preemptions (and computed again)."""
    first_scheduled_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    finish_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        nan = math.nan
        self.computed = [0] * n
        self.generated = [0] * n
        self.blocks = [0] * n
        self.preemptions = [0] * n
        self.recomputed = [0] * n
        self.first_scheduled_s = [nan] * n
        self.first_token_s = [nan] * n
        self.finish_s = [nan] * n


@dataclass
class Batch:
    """What one rank computes in one iteration: per request, new tokens and cached ones,
    and the totals the iteration's cost needs."""

    ids: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    tokens: int = 0
    """New tokens computed (the batch size seen by the projections)."""
    keys: int = 0
    """(query, key) pairs under a causal mask: n c + n (n + 1) / 2 per request."""
    kv_read_tokens: int = 0
    """Tokens whose KV the attention reads: every cached and new one."""
    sampled: int = 0
    """Requests that reach their last token and sample a new one."""
    decodes: int = 0
    """Requests past their prompt computing their one newest token."""
    steady: bool = False
    """A steady decode iteration (see :class:`RankScheduler`): ``ids`` is the running list,
    ``new_tokens`` and ``cached_tokens`` are left empty (every request computes one
    token)."""

    def add(self, rid: int, n: int, c: int, samples: bool, decode: bool) -> None:
        """Add ``n`` new tokens of request ``rid`` after ``c`` cached ones."""
        self.ids.append(rid)
        self.new_tokens.append(n)
        self.cached_tokens.append(c)
        self.tokens += n
        self.keys += n * c + n * (n + 1) // 2
        self.kv_read_tokens += c + n
        self.sampled += samples
        self.decodes += decode


class RankScheduler:
    """The waiting queue, running list and KV block pool of one data-parallel rank."""

    def __init__(
        self, state: RequestState, cfg: SchedulerConfig, total_blocks: int, lazy: bool = False
    ) -> None:
        self.st = state
        self.lazy = lazy
        """Run steady decode iterations without touching per-request state (see the class
        docstring); the owner calls :meth:`sync` before reading or changing that state."""
        self._horizon = 0
        """Steady iterations allowed since the last sync (0: not steady)."""
        self._lag = 0
        """Steady iterations run since the last sync."""
        self._keys0 = 0
        """Keys (= KV tokens read) of the first steady iteration."""
        self._phase: list[int] = []
        """Running requests needing a new KV block at steady step ``j``, by ``j % block``."""
        self._steady_batch = Batch()
        """The batch of the current steady run (the owner completes each before the next)."""
        self.budget = cfg.max_batch_tokens
        self.max_seqs = cfg.max_seqs
        self.chunked = cfg.chunked_prefill
        self.block = cfg.block_tokens
        self.reserve = math.ceil(cfg.admit_free_fraction * total_blocks)
        """Blocks that must stay free for a waiting request to be admitted beside others."""
        self.requeue_front = cfg.requeue == "front"
        self.total_blocks = total_blocks
        self.free_blocks = total_blocks
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.finished: list[int] | None = None
        """When a list, :meth:`complete` appends the requests it finishes (the owner
        empties it); None: not collected."""

    @property
    def busy(self) -> bool:
        """Whether the rank has any request to serve."""
        return bool(self.running or self.waiting)

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks holding ``tokens`` tokens of KV."""
        return -(-tokens // self.block)

    def _preempt(self, rid: int) -> None:
        st = self.st
        self.free_blocks += st.blocks[rid]
        st.blocks[rid] = 0
        st.recomputed[rid] += st.computed[rid]
        st.computed[rid] = 0
        st.preemptions[rid] += 1
        if self.requeue_front:
            self.waiting.appendleft(rid)
        else:
            self.waiting.append(rid)

    def sync(self) -> None:
        """Apply the steady decode iterations run so far to the per-request state and leave
        steady mode."""
        lag = self._lag
        if lag:
            st, bt = self.st, self.block
            comp, gen, blocks = st.computed, st.generated, st.blocks
            for rid in self.running:
                c = comp[rid]
                p = blocks[rid] * bt - c  # the first steady step that needed a new block
                comp[rid] = c + lag
                gen[rid] += lag
                if lag > p:
                    blocks[rid] += (lag - 1 - p) // bt + 1
        self._horizon = self._lag = 0

    def _enter_steady(self) -> None:
        """After an iteration: enter steady mode if every running request decodes, nothing
        waits and every request fits the token budget; the horizon stops before the first
        iteration that finishes a request."""
        running = self.running
        m = len(running)
        if self.waiting or not m or m > self.budget:
            return
        st, bt = self.st, self.block
        prompt, gen, comp, out, blocks = st.prompt, st.generated, st.computed, st.output, st.blocks
        horizon = 1 << 62
        keys = 0
        phase = [0] * bt
        for rid in running:
            g, c = gen[rid], comp[rid]
            if g < 1 or prompt[rid] + g - c != 1:
                return
            left = out[rid] - g - 1
            if left < horizon:
                horizon = left
            p = blocks[rid] * bt - c
            if not 0 <= p < bt:  # pragma: no cover - blocks always cover the computed KV
                return
            phase[p] += 1
            keys += c + 1
        if horizon > 0:
            self._horizon, self._lag, self._keys0, self._phase = horizon, 0, keys, phase
            self._steady_batch = Batch(running, [], [], m, keys, keys, m, m, True)

    def schedule(self, now_s: float) -> Batch:
        """Choose this iteration's work and allocate its KV blocks."""
        if self._horizon:
            j = self._lag
            if j < self._horizon and not self.waiting:
                want = self._phase[j % self.block]
                if want <= self.free_blocks:
                    self.free_blocks -= want
                    b = self._steady_batch  # one object per steady run, updated in place
                    k = self._keys0 + j * b.tokens
                    b.keys = b.kv_read_tokens = k
                    return b
            self.sync()
        st = self.st
        prompt, gen, comp, blocks = st.prompt, st.generated, st.computed, st.blocks
        bt = self.block
        budget = self.budget
        batch = Batch()
        running = self.running
        preempted = False
        # the loop below is batch.add() inlined: it runs once per running request per
        # iteration, the simulator's hottest path
        ids, new, cached = batch.ids, batch.new_tokens, batch.cached_tokens
        keys = kv_read = sampled = decodes = 0
        free = self.free_blocks
        i = 0
        while i < len(running) and budget > 0:
            rid = running[i]
            c = comp[rid]
            need = prompt[rid] + gen[rid] - c
            n = need if need < budget else budget
            want = -(-(c + n) // bt) - blocks[rid]
            if want > free:
                self.free_blocks = free
                victim = -1
                while want > self.free_blocks and victim != rid:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                free = self.free_blocks
                if victim == rid:  # it preempted itself: nothing else runs
                    break
            free -= want
            blocks[rid] += want
            ids.append(rid)
            new.append(n)
            cached.append(c)
            keys += n * c + n * (n + 1) // 2
            kv_read += c + n
            sampled += n == need
            decodes += c >= prompt[rid]
            budget -= n
            i += 1
        self.free_blocks = free
        batch.tokens = self.budget - budget
        batch.keys, batch.kv_read_tokens = keys, kv_read
        batch.sampled, batch.decodes = sampled, decodes
        if not preempted:
            self._admit(now_s, budget, batch)
        return batch

    def _admit(self, now_s: float, budget: int, batch: Batch) -> None:
        st = self.st
        waiting, running = self.waiting, self.running
        while waiting and budget > 0 and len(running) < self.max_seqs:
            if self.reserve and self.free_blocks < self.reserve and (running or batch.ids):
                break  # the cache is nearly full: no new prompt beside the running ones
            rid = waiting[0]
            c = st.computed[rid]
            need = st.prompt[rid] + st.generated[rid] - c
            n = need
            if n > budget:
                if not self.chunked:
                    break
                n = budget
            want = -(-(c + n) // self.block) - st.blocks[rid]
            if want > self.free_blocks:
                break
            waiting.popleft()
            running.append(rid)
            self.free_blocks -= want
            st.blocks[rid] += want
            if st.first_scheduled_s[rid] != st.first_scheduled_s[rid]:  # NaN: first time
                st.first_scheduled_s[rid] = now_s
            batch.add(rid, n, c, n == need, c >= st.prompt[rid])
            budget -= n

    def complete(self, batch: Batch, now_s: float) -> int:
        """Apply a finished iteration: KV computed, tokens sampled, requests finished;
        returns the tokens sampled."""
        if batch.steady:
            self._lag += 1
            return batch.tokens
        st = self.st
        prompt, gen, comp, out = st.prompt, st.generated, st.computed, st.output
        emitted = 0
        done: list[int] = []
        for rid, n in zip(batch.ids, batch.new_tokens):
            comp[rid] += n
            if comp[rid] == prompt[rid] + gen[rid]:
                gen[rid] += 1
                emitted += 1
                if gen[rid] == 1:
                    st.first_token_s[rid] = now_s
                if gen[rid] == out[rid]:
                    st.finish_s[rid] = now_s
                    self.free_blocks += st.blocks[rid]
                    st.blocks[rid] = 0
                    done.append(rid)
        if done:
            gone = set(done)
            self.running = [r for r in self.running if r not in gone]
            if self.finished is not None:
                self.finished.extend(done)
        if self.lazy:
            self._enter_steady()
        return emitted
