"""What drafting costs in a speculative decode step (``workload.speculative``, issue 16).

The verification itself needs no cost of its own: the scheduler gives each drafting
sequence ``k + 1`` new tokens, so the iteration cost prices them through attention
(``n c + n (n + 1) / 2`` keys, ``c + n`` KV tokens read), MoE and dense blocks, and the
head at ``k + 1`` positions. The drafter is priced here:

- ``mtp_module`` (DeepSeek-V3's multi-token prediction module, report Sec. 2.2: a
  projection of the concatenated hidden state and embedding, ``2 d_model -> d_model``,
  one transformer block and the shared output head): ``k`` draft passes per step, each
  over one token per drafting sequence: the block is priced as one layer of the model's
  own iteration at that batch (attention reading the sequence's KV, and the FFN of the
  model's last block: an MoE layer with its all-to-all for DeepSeek-V3, whose MTP block
  in the released checkpoint, ``model.layers.61``, is an MoE block), plus the head and
  the projection. Passes run after the verification, on the device, not overlapped with
  it (the engine's host time is left as the verification's).
- ``free``: nothing.

Not modelled: the draft block's own KV cache memory (one layer in 62 for DeepSeek-V3) and
the draft's tokens in the two-micro-batch timeline (the passes are serial).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from moesim.config.speculative import SpeculativeConfig
from moesim.cost.iteration import IterationCost, IterationTime


def draft_pass(cost: IterationCost, seqs: Sequence[int], kv_tokens: Sequence[int]) -> IterationTime:
    """One pass of an MTP module over ``seqs[r]`` sequences per data-parallel rank whose
    KV (``kv_tokens[r]`` tokens in all) the block's attention reads; its parts are
    attention, the block's FFN (MoE or dense), the head plus the input projection."""
    m = cost.model
    if not any(seqs):
        return IterationTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    kv = [float(k) for k in kv_tokens]
    full = cost.time(list(seqs), kv, list(kv_tokens), list(seqs))
    attention = full.attention_s / cost.layers
    moe = dense = comm = 0.0
    if (m.layers - 1) in m.moe_layer_indices:
        moe = full.moe_s / cost.n_moe
        comm = full.moe_comm_s / cost.n_moe
    else:
        dense = full.dense_s / cost.n_dense
    proj = max(cost.rf.gemm_s(s, 2 * m.d_model, m.d_model) if s else 0.0 for s in seqs)
    head = full.head_s + float(proj)
    total = attention + moe + dense + head
    return IterationTime(total, attention, moe, dense, head, full.dropped_fraction, comm)


def with_draft(
    cost: IterationCost,
    it: IterationTime,
    spec: SpeculativeConfig,
    seqs: Sequence[int],
    kv_tokens: Sequence[int],
) -> IterationTime:
    """The verification iteration ``it`` followed by the ``draft_tokens`` draft passes of
    ``spec``'s drafter over the drafting sequences (``seqs``, ``kv_tokens`` per rank)."""
    if spec.draft == "free" or not any(seqs):
        return it
    d = draft_pass(cost, seqs, kv_tokens)
    k = spec.draft_tokens
    return replace(
        it,
        total_s=it.total_s + k * d.total_s,
        attention_s=it.attention_s + k * d.attention_s,
        moe_s=it.moe_s + k * d.moe_s,
        dense_s=it.dense_s + k * d.dense_s,
        head_s=it.head_s + k * d.head_s,
        moe_comm_s=it.moe_comm_s + k * d.moe_comm_s,
    )
