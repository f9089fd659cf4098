"""The time of one serving iteration (one forward pass over every DP rank's batch).

A serving deployment here is vLLM's data-parallel attention with expert-parallel MoE
(``--data-parallel-size dp --enable-expert-parallel``): each of the ``dp`` ranks is a
tensor-parallel group of ``tp`` devices running attention, dense FFNs and the output head
on its own batch; the MoE layers are shared: every rank's tokens go through the same
all-to-all to the experts. The ranks therefore step in lock-step, layer by layer (vLLM
runs dummy batches on idle ranks for this reason), and an iteration takes

``layers x max_r attention_r + n_dense x max_r dense_r + n_moe x moe(sum_r tokens_r)
+ max_r head_r``

- **Attention of one block on one device** (heads split over tp): the one attention cost
  training uses too, :class:`moesim.cost.attention.AttentionCost`: the QKV and output
  projections (MLA: its low-rank q and kv projections) over the rank's batch tokens, then
  one fused causal attention kernel over the mixed batch, as vLLM v1 runs prefill chunks
  and decodes together (a chunk of ``n`` new tokens after ``c`` cached ones attends
  ``n c + n (n + 1) / 2`` keys and reads ``c + n`` tokens' KV; decodes come out
  memory-bound, prefills compute-bound). With tp > 1 the output projection ends in an
  all-reduce of the rank's hidden states (ring, over the topology:
  :func:`moesim.cost.collectives.all_reduce_s`).
- **MoE blocks**: :class:`moesim.cost.layer_cost.MoELayerCost` at the iteration's total
  tokens (routing, capacity, dispatch/combine over the topology, grouped expert GEMMs);
  it spreads the tokens evenly over the DP ranks, so imbalance between ranks' batch sizes
  is seen by attention but not by the MoE layer.
- **Dense FFN blocks**: ``Roofline.dense_ffn_s`` on ``dense_d_ff / tp`` columns, plus the
  all-reduce with tp > 1.
- **Output head**: a GEMM for the sequences that sample a token this iteration (vLLM
  computes logits only at those positions) over ``vocab / tp`` columns, plus a ring
  all-gather of the logits with tp > 1.

Not costed: embedding lookup, norms, rotary embedding, residual adds and sampling
(elementwise work of a few percent of a block), and the CPU-side scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from moesim.config.engine import HostCost
from moesim.cost.attention import AttentionCost, AttentionKernel, measured_rate
from moesim.cost.collectives import all_gather_s, all_reduce_s
from moesim.cost.layer_cost import LayerCostModel, LayerSample
from moesim.system import System
from moesim.units import US

SCALAR_RANKS = 64
"""Up to this many DP ranks an iteration is priced in plain float arithmetic, beyond it
with numpy arrays (the two agree to the last bit for the same inputs)."""


@dataclass(frozen=True)
class IterationTime:
    """One iteration's time and where it went, seconds (the parts sum to ``total_s``)."""

    total_s: float
    attention_s: float
    moe_s: float
    dense_s: float
    head_s: float
    dropped_fraction: float
    """Expected share of token-choice slots the MoE layers drop (capacity)."""
    moe_comm_s: float = 0.0
    """Of ``moe_s``, the all-to-all part of the MoE layers' critical paths."""
    host_s: float = 0.0
    """The engine's host-side time not hidden under the device's (0 for the ideal engine)."""


def _affine(cost: Callable[..., float]) -> tuple[float, float]:
    """Intercept and slope of a collective's cost, which is affine in its bytes
    (alpha-beta: the step rates do not depend on the message size)."""
    t1, t2 = cost(nbytes=1.0), cost(nbytes=2.0)
    return t1 - (t2 - t1), t2 - t1


class IterationCost:
    """Iteration times of one system: projections, FFNs, heads and collectives are memoized
    by size."""

    def __init__(self, system: System, moe_cost: LayerCostModel) -> None:
        s = system.scenario
        m, p = s.model, s.parallelism
        self.rf = system.layer_costs.roofline
        self.moe_cost = moe_cost
        engine = getattr(s.workload, "engine", None)
        self.host: HostCost = engine.host if engine is not None else HostCost()
        kernel: AttentionKernel = engine.attention if engine is not None else "fused"
        self.model = m
        self.tp = p.tp
        self.layers = m.layers
        self.n_moe = len(m.moe_layer_indices)
        self.n_dense = m.layers - self.n_moe
        rate = measured_rate(s.cluster.profile or s.cluster.accelerator.profile)
        self.attention = AttentionCost(
            self.rf, m, p.tp, kernel, rate if kernel == "fused" else None, s.cluster.accelerator
        )
        self.act_bytes = system.layer_costs.combine_bytes_per_token // m.d_model
        self._dense: dict[int, float] = {}
        self._head: dict[int, float] = {}
        # the devices of each DP rank's TP group (tp fastest in the rank order)
        groups = [[r * p.tp + t for t in range(p.tp)] for r in range(p.dp)]
        profile = s.cluster.profile or s.cluster.accelerator.profile
        fits = [c for c in profile.collectives if c.op == "all_reduce"] if profile else []
        steps = 2 * (p.tp - 1)
        alpha = (
            min(fits, key=lambda c: abs(c.world - p.tp)).alpha_us * 1e-6 / steps
            if fits and steps
            else 0.0
        )
        paths = system.paths
        self.ar = np.array(
            [
                _affine(partial(all_reduce_s, paths, g, algorithm="ring", alpha_s=alpha))
                for g in groups
            ]
        )
        self.ag = np.array(
            [_affine(partial(all_gather_s, paths, g, alpha_s=alpha)) for g in groups]
        )
        self._ar = [(float(a), float(b)) for a, b in self.ar]
        self._ag = [(float(a), float(b)) for a, b in self.ag]
        self._moe: dict[int, LayerSample] = {}
        self.routed: tuple[int, LayerSample] | None = None
        """(tokens, MoE sample) of the iteration about to be priced when its routing is
        consumed in order (trace, logits: :mod:`moesim.cost.routed_layers`); used by
        :meth:`time` for a batch of exactly those tokens, in place of the memoized one."""
        rf, a = self.rf, self.attention
        overhead = rf.overhead_s if rf.gemm_overhead_s is None else rf.gemm_overhead_s
        self._fused_max = (
            (
                2.0 * a.width,
                a.width,
                a.kv_bytes,
                a.core_bytes_per_element,
                rf.flops_per_s,
                rf.bytes_per_s,
                overhead,
            )
            if kernel == "fused"
            and a.rate is None
            and a.core_scale == 1.0
            and not a.absorbed_width
            and (rf.smoothness == float("inf") or rf.smoothness > 1e6)
            else None
        )
        """The fused attention kernel's constants when its roofline is a hard max (then
        :meth:`_time_scalar` prices it inline)."""

    # --- memoized per-size costs of one device ------------------------------------------
    def projections_s(self, tokens: int) -> float:
        """QKV (or MLA q/kv) and output projections of one block over ``tokens``."""
        return self.attention.projections_s(tokens)

    def dense_ffn_s(self, tokens: int) -> float:
        """One dense FFN block's shard over ``tokens``."""
        if tokens <= 0 or not self.n_dense:
            return 0.0
        t = self._dense.get(tokens)
        if t is None:
            m = self.model
            d_ff = (m.dense_d_ff or 0) // self.tp
            t = self.rf.dense_ffn_s(tokens, m.d_model, d_ff, m.dense_activation or m.activation)
            self._dense[tokens] = t
        return t

    def head_s(self, seqs: int) -> float:
        """The output head's shard for ``seqs`` sampled positions."""
        if seqs <= 0:
            return 0.0
        t = self._head.get(seqs)
        if t is None:
            m = self.model
            t = float(self.rf.gemm_s(seqs, m.d_model, m.vocab_size // self.tp))
            self._head[seqs] = t
        return t

    # --- one iteration ------------------------------------------------------------------
    def time(
        self,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """The iteration over every DP rank's batch.

        Per rank: ``tokens`` processed, ``keys`` (query, key) pairs attended (causal),
        ``kv_read_tokens`` tokens whose KV the attention kernel reads, ``sampled``
        sequences that produce a token.
        """
        if len(tokens) <= SCALAR_RANKS:
            return self._time_scalar(tokens, keys, kv_read_tokens, sampled)
        n = np.asarray(tokens, dtype=float)
        busy = n > 0
        attn = self.attention
        core = attn.scores_s(n, keys, kv_read_tokens, sampled)
        hidden = n * self.model.d_model * self.act_bytes
        reduce = np.where(busy & (self.tp > 1), self.ar[:, 0] + self.ar[:, 1] * hidden, 0.0)
        proj = np.array([attn.projections_s(t) for t in tokens])
        attention = float(np.max(np.where(busy, core + proj + reduce, 0.0)))
        dense = 0.0
        if self.n_dense:
            ffn = np.array([self.dense_ffn_s(t) for t in tokens])
            dense = float(np.max(ffn + reduce))
        head_each = np.array([self.head_s(k) for k in sampled])
        if self.tp > 1:
            logits = np.asarray(sampled, dtype=float) * self.model.vocab_size * self.act_bytes
            head_each = head_each + np.where(logits > 0, self.ag[:, 0] + self.ag[:, 1] * logits, 0)
        head = float(np.max(head_each))
        return self._compose(attention, dense, head, int(n.sum()), tokens, sampled, kv_read_tokens)

    def _time_scalar(
        self,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """:meth:`time` in plain float arithmetic, rank by rank: the same operations in the
        same order as the vectorized form (numpy calls on a handful of elements cost more
        than the arithmetic)."""
        attn = self.attention
        d_model, vocab, act = self.model.d_model, self.model.vocab_size, self.act_bytes
        tp = self.tp > 1
        ar, ag = self._ar, self._ag
        proj, heads = attn._proj, self._head
        fast = self._fused_max
        if fast is not None:
            w2, w, kvb, bpe, fps, bps, ovh = fast
        n_dense = self.n_dense
        attention = dense = head = 0.0
        total_tokens = 0
        for r, t in enumerate(tokens):
            total_tokens += t
            reduce = 0.0
            if t > 0:
                if tp:
                    a0, a1 = ar[r]
                    reduce = a0 + a1 * (float(t) * d_model * act)
                if fast is not None:  # AttentionCost.score_s inlined (fused, hard max)
                    tc = w2 * float(keys[r]) / fps
                    tm = (float(kv_read_tokens[r]) * kvb + float(t) * w * bpe) / bps
                    core = (tc if tc >= tm else tm) + ovh
                else:
                    core = attn.score_s(t, keys[r], kv_read_tokens[r], sampled[r])
                pr = proj.get(t)
                if pr is None:
                    pr = attn.projections_s(t)
                a = core + pr + reduce
                if a > attention:
                    attention = a
            if n_dense:
                d = self.dense_ffn_s(t) + reduce
                if d > dense:
                    dense = d
            k = sampled[r]
            h = heads.get(k) if k > 0 else 0.0
            if h is None:
                h = self.head_s(k)
            if tp:
                logits = float(k) * vocab * act
                if logits > 0:
                    g0, g1 = ag[r]
                    h = h + (g0 + g1 * logits)
            if h > head:
                head = h
        return self._compose(attention, dense, head, total_tokens, tokens, sampled, kv_read_tokens)

    def _compose(
        self,
        attention: float,
        dense: float,
        head: float,
        total_tokens: int,
        tokens: list[int],
        sampled: list[int],
        kv_read: list[int],
    ) -> IterationTime:
        """The iteration from the busiest rank's block costs: every layer's attention, the
        MoE layers at the iteration's total tokens, the dense FFNs, the head, and the
        engine's host time (see :meth:`with_host`)."""
        r = self.routed
        moe = r[1] if r is not None and r[0] == total_tokens else self._moe_sample(total_tokens)
        parts = (self.layers * attention, self.n_moe * moe.time_s, self.n_dense * dense, head)
        return self.with_host(
            parts,
            moe.dropped_fraction,
            self.n_moe * min(moe.comm_s, moe.time_s),
            self.host_s(tokens, sampled, kv_read),
        )

    def with_host(
        self,
        parts: tuple[float, float, float, float],
        dropped_fraction: float,
        moe_comm_s: float,
        host_s: float,
    ) -> IterationTime:
        """An iteration of device ``parts`` (attention, MoE, dense, head) and ``host_s`` of
        the engine's host work: serial, or hidden under the device's where it overlaps."""
        device = sum(parts)
        total = max(device, host_s) if self.host.overlap else device + host_s
        return IterationTime(total, *parts, dropped_fraction, moe_comm_s, total - device)

    def _moe_sample(self, tokens: int) -> LayerSample:
        """The MoE layer's sample at ``tokens``, memoized (the layer cost is deterministic
        in the token count)."""
        s = self._moe.get(tokens)
        if s is None:
            s = self._moe[tokens] = self.moe_cost.sample(tokens)
        return s

    def with_prompts(
        self,
        it: IterationTime,
        tokens: list[int],
        sampled: list[int],
        kv_read: list[int],
        prompts: list[int],
        new_lengths: list[int],
    ) -> IterationTime:
        """``it`` with its host time recomputed for ``prompts`` prompts prefilled per rank,
        ``new_lengths`` of their lengths new to the rank's process; device parts as they are."""
        parts = (it.attention_s, it.moe_s, it.dense_s, it.head_s)
        host = self.host_s(tokens, sampled, kv_read, prompts, new_lengths)
        return self.with_host(parts, it.dropped_fraction, it.moe_comm_s, host)

    def host_s(
        self,
        tokens: list[int],
        sampled: list[int],
        kv_read: list[int],
        prompts: list[int] | None = None,
        new_lengths: list[int] | None = None,
    ) -> float:
        """The engine's host-side time of the iteration: the busiest DP rank's (each rank's
        host process prepares its own batch), seconds; ``prompts``: per rank, the prompts
        (or prompt chunks) it prefills, each dispatching its own per-layer kernels, and
        ``new_lengths`` of distinct lengths among them its process has not run before."""
        h = self.host
        if h.zero:
            return 0.0
        layers = h.per_layer_us * self.layers
        per_prompt = h.per_prompt_layer_us * self.layers if prompts else 0.0
        first = h.first_prompt_length_us if new_lengths else 0.0
        # graphed decode steps: only a rank computing more tokens than it samples (prompt
        # tokens) dispatches its layers eagerly
        eager = not h.graph_decode
        worst = max(
            (
                h.fixed_us
                + (layers if eager or t > k else 0.0)
                + h.per_sequence_us * k
                + h.per_token_us * t
                + h.per_kv_token_us * c
                + (per_prompt * prompts[r] if per_prompt and prompts else 0.0)
                + (first * new_lengths[r] if first and new_lengths else 0.0)
                for r, (t, k, c) in enumerate(zip(tokens, sampled, kv_read))
                if t > 0
            ),
            default=0.0,
        )
        return worst * US
