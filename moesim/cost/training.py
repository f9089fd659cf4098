"""The costs of a training step's pieces: an attention + MoE block and an attention + dense
block per micro-batch (forward and backward, their all-to-all, tensor-parallel and ZeRO-3
gather shares), and each pipeline stage's sum with its activation send.

Attention comes from the one attention cost serving uses too
(:func:`moesim.cost.attention.attention_forward_s`: projections, then a fused causal
kernel over the micro-batch's sequences of ``seq_len`` new tokens each), dense FFNs from
the device's cost model (:class:`moesim.cost.compute.Roofline`), MoE blocks from the
per-layer path (:class:`moesim.cost.layer_cost.MoELayerCost`: routing, all-to-all over the
topology, experts, combine), tensor-parallel collectives from
:mod:`moesim.cost.collectives`.

Conventions: backward costs twice the forward's products (input and weight gradients) and
the same all-to-all bytes as the forward (dispatch and combine, reversed); attention scores
cost 2.5x in backward (FlashAttention-2, Dao 2023). Full recomputation reruns each block's
forward during backward; selective reruns the attention scores. With ``overlap_a2a`` a
block's all-to-all (a) and compute (c) run as a two-stage pipeline over two half
micro-batches: (a + c) / 2 + max(a, c) / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moesim.config.training import TrainingWorkload
from moesim.cost.attention import attention_forward_s
from moesim.cost.collectives import all_gather_s, reduce_scatter_s
from moesim.cost.layer_cost import MoELayerCost
from moesim.derived.model_figures import figures
from moesim.system import System
from moesim.units import BF16_BYTES, GB


@dataclass(frozen=True)
class BlockCost:
    """Seconds of one block for one micro-batch on one stage, and their communication."""

    fwd_s: float
    bwd_s: float
    a2a_s: float
    """All-to-all time inside fwd + bwd."""
    tp_s: float
    """Tensor-parallel collective time inside fwd + bwd."""
    gather_s: float = 0.0
    """ZeRO-3 parameter all-gathers inside fwd + bwd."""


@dataclass(frozen=True)
class StageCost:
    """One stage's cost per micro-batch (sums over its blocks) and its activation send."""

    fwd_s: float
    bwd_s: float
    a2a_s: float
    tp_s: float
    p2p_s: float
    gather_s: float = 0.0
    """ZeRO-3 parameter all-gathers inside fwd + bwd."""


def _combine(a: float, c: float, overlap: bool) -> float:
    return (a + c) / 2 + max(a, c) / 2 if overlap else a + c


def block_costs(system: System, w: TrainingWorkload, cost: MoELayerCost) -> dict[str, BlockCost]:
    """Costs of an attention + MoE block and an attention + dense block, per micro-batch."""
    s = system.scenario
    m, p = s.model, s.parallelism
    rf = system.layer_costs.roofline
    tokens = w.seq_len * w.micro_batch_sequences  # per data-parallel rank
    f = figures(m)
    attn_params = f.attention_params_per_layer
    # the one attention cost serving uses too: every sequence computes seq_len new tokens
    attn = attention_forward_s(rf, m, p.tp, [(w.seq_len, 0)] * w.micro_batch_sequences)
    proj, scores = attn.projections_s, attn.scores_s
    attn_fwd = proj + scores
    attn_bwd = 2 * proj + 2.5 * scores
    if w.recompute == "selective":
        attn_bwd += scores
    tp_group = [system.layout.device(0, i) for i in range(p.tp)]
    act = tokens * m.d_model * BF16_BYTES
    tp_pair = (
        (all_gather_s(system.paths, tp_group, act) + reduce_scatter_s(system.paths, tp_group, act))
        if p.tp > 1
        else 0.0
    )
    # MoE block: the per-layer path over the whole stage's tokens (every DP rank at once)
    sample = cost.sample(tokens * p.dp)
    a = sample.comm_s
    c = sample.time_s - a
    moe_fwd = _combine(a, c, w.overlap_a2a)
    moe_bwd = _combine(a, 2 * c, w.overlap_a2a)
    d_ff = (m.dense_d_ff or m.expert_d_ff) // p.tp
    dense_fwd = rf.dense_ffn_s(tokens, m.d_model, d_ff, m.dense_activation or m.activation)
    # ZeRO-3 keeps 1/group of each parameter: a block gathers its weights before its forward
    # and again before its backward (Rajbhandari et al. 2020, Sec. 5.3: 1.5x data-parallel
    # traffic); dense parameters over dp, experts over the expert-data-parallel group
    gather = {"moe": 0.0, "dense": 0.0}
    if w.zero_stage == 3:
        layout = system.layout
        dense_group = [layout.device(0, d * p.tp) for d in range(p.dp)]
        expert_group = [layout.device(0, g * p.ep * p.etp) for g in range(layout.edp)]
        attn_bytes = BF16_BYTES * attn_params / p.tp
        expert_bytes = BF16_BYTES * (m.experts // p.ep) * f.expert_params / p.etp
        shared_bytes = BF16_BYTES * f.shared_expert_params * m.shared_experts / p.tp
        gather["moe"] = all_gather_s(system.paths, dense_group, attn_bytes + shared_bytes) + (
            all_gather_s(system.paths, expert_group, expert_bytes)
        )
        gather["dense"] = all_gather_s(
            system.paths, dense_group, attn_bytes + BF16_BYTES * f.dense_ffn_params / p.tp
        )
    out = {}
    for kind, (fwd, bwd, a2a, tp) in {
        "moe": (attn_fwd + moe_fwd + tp_pair, attn_bwd + moe_bwd + tp_pair, 2 * a, 2 * tp_pair),
        "dense": (
            attn_fwd + dense_fwd + 2 * tp_pair,
            attn_bwd + 2 * dense_fwd + 2 * tp_pair,
            0.0,
            4 * tp_pair,
        ),
    }.items():
        if w.recompute == "full":
            bwd += fwd
        g = gather[kind]
        out[kind] = BlockCost(fwd + g, bwd + g, a2a, tp, 2 * g)
    return out


def stage_costs(
    system: System, w: TrainingWorkload, blocks: dict[str, BlockCost]
) -> list[StageCost]:
    """Each stage's blocks (layers split evenly, Megatron-style), plus the output head on
    the last stage (the embedding lookup, a gather of tokens x d_model, is not costed)."""
    s = system.scenario
    m, p = s.model, s.parallelism
    rf = system.layer_costs.roofline
    tokens = w.seq_len * w.micro_batch_sequences
    per_stage = math.ceil(m.layers / p.pp)
    moe = set(m.moe_layer_indices)
    head = float(rf.gemm_s(tokens, m.d_model, math.ceil(m.vocab_size / p.tp)))
    act_bytes = tokens * m.d_model * BF16_BYTES / p.tp
    out = []
    for stage in range(p.pp):
        layers = range(stage * per_stage, min(m.layers, (stage + 1) * per_stage))
        picked = [blocks["moe" if i in moe else "dense"] for i in layers]
        fwd = sum(b.fwd_s for b in picked)
        bwd = sum(b.bwd_s for b in picked)
        if stage == p.pp - 1:
            fwd += head
            bwd += 2 * head
        p2p = 0.0
        if stage < p.pp - 1:
            src = system.layout.device(stage, 0)
            dst = system.layout.device(stage + 1, 0)
            path = system.paths.edge_ids(src, dst)
            bw = float(system.paths.bandwidth_gbps[path].min()) * GB if len(path) else math.inf
            p2p = act_bytes / bw + system.paths.latency_s(src, dst)
        out.append(
            StageCost(
                fwd,
                bwd,
                sum(b.a2a_s for b in picked),
                sum(b.tp_s for b in picked),
                p2p,
                sum(b.gather_s for b in picked),
            )
        )
    return out
