"""Speculative decoding in the scheduler (``workload.speculative``, issue 16).

:class:`SpeculativeScheduler` is :class:`moesim.engine.batching.RankScheduler` with
multi-token decode steps; prefill chunks, admission, KV blocks and preemption are the
base scheduler's:

- A running request that decodes (its one pending token is a sampled one: ``generated
  >= 1`` and ``prompt + generated - computed == 1``) takes ``1 + k`` new tokens (fewer
  when the token budget is short: ``1 + d`` with ``d < k`` drafts), attends and reads KV
  as that many new tokens, holds KV blocks for them, counts ``1 + d`` logit positions
  in ``sampled`` (the head runs at every verified position) and ``1 + d`` tokens in
  ``decodes`` (so the records' prefill tokens stay prompt tokens). A request
  admitted in this iteration decodes without drafts (its first draft comes with its first
  step).
- When the iteration ends, each drafting request's accepted drafts ``a`` are drawn: draft
  ``i`` is accepted with probability ``rates[i-1]`` if drafts ``1 .. i-1`` were, so ``a``
  is the number of leading accepted drafts. It keeps the KV of the pending token and the
  accepted drafts and samples one more token: ``e = min(1 + a, output - generated)``
  tokens are emitted and computed (a request never emits more than its output length),
  and the request finishes when it reaches its output. The KV blocks allocated for
  rejected drafts stay with the request until it finishes or is preempted (they are
  reused by its next step's tokens).
- Randomness: each request's draws come from its own stream ``("speculative", id)`` of
  the run's seed, one uniform per draft per step, so a request accepts the same drafts
  whichever rank or instance serves it and however the batches fall.

The batch also carries, per rank, the drafting sequences and the KV tokens they read, for
the drafter's cost (:func:`moesim.cost.speculative.with_draft`). Steady decode runs in
closed form are off with speculation (each step's acceptance is a draw).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim import rng
from moesim.config.serving import SchedulerConfig
from moesim.config.speculative import SpeculativeConfig
from moesim.cost.speculative import with_draft
from moesim.engine.batching import Batch, RankScheduler, RequestState

__all__ = ["SpeculativeBatch", "SpeculativeScheduler", "draft_load", "with_draft"]


@dataclass
class SpeculativeBatch(Batch):
    """A rank's batch with the drafting requests' drafts."""

    drafts: dict[int, int] = field(default_factory=dict)
    """Drafts verified this iteration, by request id (decoding requests only)."""
    drafting_kv: int = 0
    """KV tokens the drafting requests read (their cached and new tokens)."""


class SpeculativeScheduler(RankScheduler):
    """A rank's scheduler whose decode steps verify drafts (see the module docstring)."""

    def __init__(
        self,
        state: RequestState,
        cfg: SchedulerConfig,
        total_blocks: int,
        spec: SpeculativeConfig,
        seed: int,
        streams: dict[int, np.random.Generator] | None = None,
    ) -> None:
        super().__init__(state, cfg, total_blocks, lazy=False)
        self.k = spec.draft_tokens
        self.rates = np.asarray(spec.rates, dtype=float)
        self.seed = seed
        self.streams: dict[int, np.random.Generator] = {} if streams is None else streams
        """Each unfinished request's acceptance stream (may be shared by ranks)."""

    def schedule(self, now_s: float) -> Batch:
        st = self.st
        prompt, gen, comp, blocks = st.prompt, st.generated, st.computed, st.blocks
        bt = self.block
        budget = self.budget
        batch = SpeculativeBatch()
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            rid = running[i]
            c = comp[rid]
            need = prompt[rid] + gen[rid] - c
            decoding = need == 1 and gen[rid] >= 1
            want_n = 1 + self.k if decoding else need
            n = want_n if want_n < budget else budget
            want = max(0, -(-(c + n) // bt) - blocks[rid])
            if want > self.free_blocks:
                victim = -1
                while want > self.free_blocks and victim != rid:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                if victim == rid:
                    break
            self.free_blocks -= want
            blocks[rid] += want
            if decoding:
                batch.drafts[rid] = n - 1
                batch.drafting_kv += c + n
                batch.add(rid, n, c, False, True)
                batch.sampled += n  # logits at every verified position
                batch.decodes += n - 1  # its drafts are decode tokens, not prompt
            else:
                batch.add(rid, n, c, n == need, c >= prompt[rid])
            budget -= n
            i += 1
        if not preempted:
            self._admit(now_s, budget, batch)
        return batch

    def complete(self, batch: Batch, now_s: float) -> int:
        assert isinstance(batch, SpeculativeBatch)
        st = self.st
        prompt, gen, comp, out = st.prompt, st.generated, st.computed, st.output
        emitted = 0
        done: list[int] = []
        drafts = batch.drafts
        for rid, n in zip(batch.ids, batch.new_tokens):
            d = drafts.get(rid)
            if d is None:  # a prefill chunk or a draft-less first decode: the base rule
                comp[rid] += n
                if comp[rid] != prompt[rid] + gen[rid]:
                    continue
                e = 1
            else:
                e = min(1 + self._accepted(rid, d), out[rid] - gen[rid])
                comp[rid] += e
            gen[rid] += e
            emitted += e
            if gen[rid] == e:  # its first token
                st.first_token_s[rid] = now_s
            if gen[rid] == out[rid]:
                st.finish_s[rid] = now_s
                self.free_blocks += st.blocks[rid]
                st.blocks[rid] = 0
                self.streams.pop(rid, None)
                done.append(rid)
        if done:
            gone = set(done)
            self.running = [r for r in self.running if r not in gone]
            if self.finished is not None:
                self.finished.extend(done)
        return emitted

    def _accepted(self, rid: int, drafts: int) -> int:
        """Leading drafts accepted of ``drafts`` verified (one uniform per draft)."""
        if not drafts:
            return 0
        g = self.streams.get(rid)
        if g is None:
            g = self.streams[rid] = rng.stream(self.seed, "speculative", rid)
        ok = g.random(self.k)[:drafts] < self.rates[:drafts]  # k draws: streams stay aligned
        return int(np.argmin(ok)) if not ok.all() else drafts


def draft_load(batches: list[Batch]) -> tuple[list[int], list[int]]:
    """Per rank: the requests drafting this iteration and the KV tokens they read."""
    seqs, kv = [], []
    for b in batches:
        if isinstance(b, SpeculativeBatch):
            seqs.append(len(b.drafts))
            kv.append(b.drafting_kv)
        else:  # pragma: no cover - every rank of a speculative server drafts
            seqs.append(0)
            kv.append(0)
    return seqs, kv
