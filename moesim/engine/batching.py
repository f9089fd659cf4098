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

    def __init__(self, state: RequestState, cfg: SchedulerConfig, total_blocks: int) -> None:
        self.st = state
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

    def schedule(self, now_s: float) -> Batch:
        """Choose this iteration's work and allocate its KV blocks."""
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
        return emitted
