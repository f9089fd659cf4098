"""Two-micro-batch overlap of a serving iteration (DeepSeek's dual-batch overlap, issue 16):
the batch is split into two micro-batches and the compute of one runs while the other's
all-to-all is on the wire, priced by a two-stream timeline, not by a discount.

DeepSeek-AI, "Day 6: DeepSeek-V3/R1 Inference System Overview" (open-infra-index,
2025-03-01) and ``deepseek-ai/profile-data`` (README, 2025-03): prefill and decode split a
batch into two micro-batches executed alternately, so that "the communication cost of one
microbatch is hidden behind the computation of the other"; the attention load is balanced
between the two (a prompt may be split between them).

The timeline (:func:`overlapped_s`): each micro-batch runs its ops in model order, per
layer ``attention`` then, in an MoE layer, ``dispatch`` -> ``experts`` -> ``combine``, or
a dense FFN, and finally the output head. Compute ops (attention, experts, dense FFN,
head) run on one compute stream, the dispatch and combine on one communication stream;
each stream takes its ops in DeepSeek's alternating order (compute: A.attention,
B.attention, A.experts, B.experts, ...; communication: A.dispatch, B.dispatch, A.combine,
B.combine, ...) and an op starts when its stream is free and the micro-batch's previous
op has ended. The iteration takes the timeline's makespan: what is not hidden shows up as
compute waiting for the wire (or the reverse).

Op durations come from the same iteration cost as an un-split iteration
(:class:`moesim.cost.iteration.IterationCost`), at each micro-batch's size: per layer,
the busiest rank's attention; per MoE layer, the MoE layer's all-to-all part on its
critical path (split into dispatch and combine by their bytes per token: DeepEP sends
the dispatch in FP8 and the combine in BF16, DeepSeek Day 6) and the rest as the expert
phase (gate, queueing and grouped GEMMs); the dense FFNs; the head. The host time is the
whole batch's, as in an un-split iteration.

Split (:func:`split_batch`): each rank's tokens, attended keys, KV reads and sampled
sequences in halves (A takes the odd one), so the two micro-batches carry equal attention
work, as DeepSeek balances them. The SMs DeepEP's normal kernels take from the compute
slow it while they run (:mod:`moesim.engine.sm_sharing`). Not modelled: DeepSeek's
decode-time split of the attention into two steps (a 5-stage pipeline, which changes only
the interleaving grain).
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.cost.iteration import IterationCost, IterationTime
from moesim.engine.serving_hooks import HealthyServing
from moesim.engine.sm_sharing import compute_rate_during_comm, shared_overlapped_s
from moesim.system import System

COMPUTE, COMM = 0, 1


@dataclass(frozen=True)
class MicroBatchOps:
    """One micro-batch's op durations, seconds: per layer of the model, its attention; per
    MoE layer, dispatch, experts and combine; per dense layer, its FFN; and the head."""

    attention_s: float
    dispatch_s: float
    experts_s: float
    combine_s: float
    dense_s: float
    head_s: float


def split_batch(values: list[int] | list[float]) -> tuple[list[float], list[float]]:
    """Each rank's figure in two halves, the first taking the odd unit of whole numbers."""
    a: list[float] = []
    b: list[float] = []
    for v in values:
        if isinstance(v, int):
            h = v // 2
            a.append(v - h)
            b.append(h)
        else:
            a.append(v / 2)
            b.append(v / 2)
    return a, b


def overlapped_s(moe_layers: list[bool], a: MicroBatchOps, b: MicroBatchOps) -> float:
    """The makespan of two micro-batches over the model's layers (``moe_layers[l]``: layer
    ``l`` is an MoE layer) on one compute and one communication stream, in DeepSeek's
    alternating order (see the module docstring)."""
    free = [0.0, 0.0]  # when each stream is next free
    done = [0.0, 0.0]  # when each micro-batch's last op ended
    mbs = (a, b)

    def run(mb: int, stream: int, dt: float) -> None:
        start = free[stream] if free[stream] > done[mb] else done[mb]
        free[stream] = done[mb] = start + dt

    for moe in moe_layers:
        for i in (0, 1):
            run(i, COMPUTE, mbs[i].attention_s)
        if moe:
            for i in (0, 1):
                run(i, COMM, mbs[i].dispatch_s)
            for i in (0, 1):
                run(i, COMPUTE, mbs[i].experts_s)
            for i in (0, 1):
                run(i, COMM, mbs[i].combine_s)
        else:
            for i in (0, 1):
                run(i, COMPUTE, mbs[i].dense_s)
    for i in (0, 1):
        run(i, COMPUTE, mbs[i].head_s)
    return max(done)


class DualBatchServing(HealthyServing):
    """Healthy serving hooks whose iterations run as two overlapped micro-batches."""

    def __init__(
        self, dp: int, moe_layers: list[bool], dispatch_share: float, compute_rate: float = 1.0
    ) -> None:
        """``moe_layers``: which of the model's layers are MoE layers, in order;
        ``dispatch_share``: the dispatch's share of the all-to-all bytes per token
        (dispatch / (dispatch + combine)); ``compute_rate``: the compute's progress rate
        while the all-to-all runs (:mod:`moesim.engine.sm_sharing`; 1: unaffected)."""
        super().__init__(dp)
        self.compute_rate = compute_rate
        self.moe_layers = moe_layers
        self.n_moe = sum(moe_layers)
        self.n_dense = len(moe_layers) - self.n_moe
        self.dispatch_share = dispatch_share

    def _ops(self, it: IterationTime) -> MicroBatchOps:
        layers = len(self.moe_layers)
        comm = it.moe_comm_s / self.n_moe if self.n_moe else 0.0
        moe = it.moe_s / self.n_moe if self.n_moe else 0.0
        return MicroBatchOps(
            attention_s=it.attention_s / layers,
            dispatch_s=comm * self.dispatch_share,
            experts_s=moe - comm,
            combine_s=comm * (1.0 - self.dispatch_share),
            dense_s=it.dense_s / self.n_dense if self.n_dense else 0.0,
            head_s=it.head_s,
        )

    def iteration_time(
        self,
        cost: IterationCost,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """The iteration as two micro-batches on the timeline: ``attention_s``, ``dense_s``
        and ``head_s`` are both micro-batches' compute, ``moe_s`` the rest of the makespan
        (expert compute and the all-to-all left exposed), ``moe_comm_s`` the exposed part
        (makespan minus all compute, at least 0)."""
        halves = [split_batch(v) for v in (tokens, keys, kv_read_tokens, sampled)]
        (ta, tb), (ka, kb), (ra, rb), (sa, sb) = halves
        if sum(tb) == 0:  # one token in all: nothing to split
            return cost.time(tokens, keys, kv_read_tokens, sampled)
        ia = cost.time([int(x) for x in ta], ka, [int(x) for x in ra], [int(x) for x in sa])
        ib = cost.time([int(x) for x in tb], kb, [int(x) for x in rb], [int(x) for x in sb])
        oa, ob = self._ops(ia), self._ops(ib)
        if self.compute_rate < 1.0:
            span = shared_overlapped_s(self.moe_layers, oa, ob, self.compute_rate)
        else:
            span = overlapped_s(self.moe_layers, oa, ob)
        attention = ia.attention_s + ib.attention_s
        dense = ia.dense_s + ib.dense_s
        head = ia.head_s + ib.head_s
        compute = attention + dense + head + self.n_moe * (oa.experts_s + ob.experts_s)
        exposed = max(span - compute, 0.0)
        moe = max(span - attention - dense - head, 0.0)
        return cost.with_host(
            (attention, moe, dense, head),
            (ia.dropped_fraction + ib.dropped_fraction) / 2,
            exposed,
            cost.host_s(tokens, sampled, kv_read_tokens),
        )


def dual_batch_hooks(system: System) -> DualBatchServing:
    """The two-micro-batch hooks of a system: its model's MoE layers, its all-to-all's
    dispatch and combine bytes per token."""
    s = system.scenario
    m = s.model
    moe = set(m.moe_layer_indices)
    lc = system.layer_costs
    share = lc.dispatch_bytes_per_token / (lc.dispatch_bytes_per_token + lc.combine_bytes_per_token)
    rate = compute_rate_during_comm(s.cluster.accelerator, s.parallelism)
    return DualBatchServing(s.parallelism.dp, [i in moe for i in range(m.layers)], share, rate)
