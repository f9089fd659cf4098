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

import numpy as np

from moesim.config.training import TrainingWorkload
from moesim.cost.attention import AttentionCost, causal_keys, measured_rate
from moesim.cost.collectives import all_gather_s, reduce_scatter_s
from moesim.cost.layer_cost import MoELayerCost
from moesim.cost.padded import PaddedExperts
from moesim.cost.step_kernels import ROPE_PASSES, StepKernels
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


def _expert_products_s(system: System, tokens: int) -> float:
    """Forward time of the expert products (routed and shared) on one device when the
    ``tokens`` of its expert-parallel group (``ep`` ranks' micro-batches) spread evenly
    over the experts: the part of an MoE layer whose
    backward does twice the work (input and weight gradients); the rest of the layer
    (routing, permutation, activation, combine) has a backward about as long as itself."""
    s = system.scenario
    m, p = s.model, s.parallelism
    rf = system.layer_costs.roofline
    d_ff = m.expert_d_ff // p.etp
    up_n = (2 if m.is_gated else 1) * d_ff
    local = max(1, m.experts // p.ep)
    per_expert = tokens * m.top_k / m.experts
    padded = PaddedExperts.of(s.policies, m)
    einsum = 0.0
    if padded is not None:
        # padded experts compute every group's full capacity, of every rank of the group;
        # the backward also runs one more einsum than the forward's two (the combine's
        # gradients towards the expert outputs and towards the gate weights, the
        # dispatch's towards the tokens)
        rank_tokens = tokens // max(1, p.ep)
        per_expert = padded.groups(rank_tokens).rows_per_expert * max(1, p.ep)
        einsum = padded.einsum_s(rf, rank_tokens, m.d_model)
    n = np.full(local, per_expert)
    if system.layer_costs.expert_kernel == "loop":
        t = float(rf.gemm_s(n, m.d_model, up_n).sum() + rf.gemm_s(n, d_ff, m.d_model).sum())
    else:
        t = rf.grouped_product_s(n, m.d_model, up_n) + rf.grouped_product_s(n, d_ff, m.d_model)
    if m.shared_experts:
        width = m.shared_d_ff * m.shared_experts // p.tp
        shared_up = (2 if m.is_gated else 1) * width
        local_tokens = tokens // max(1, p.ep)
        t += float(
            rf.gemm_s(local_tokens, m.d_model, shared_up)
            + rf.gemm_s(local_tokens, width, m.d_model)
        )
    return t + einsum


def step_kernels(system: System) -> StepKernels:
    """The device's training-step kernels (measured profile section, else counted)."""
    s = system.scenario
    return StepKernels.of(
        system.layer_costs.roofline, s.cluster.profile or s.cluster.accelerator.profile
    )


def _glue_s(
    k: StepKernels, system: System, w: TrainingWorkload, tokens: int
) -> tuple[float, float, float, float]:
    """(attention-half fwd, bwd, MoE/FFN-half fwd, bwd) of a block's kernels around its
    products: the two RMSNorms and residual adds (in the residual stream's dtype), QK-norm
    and rotary embeddings on the queries and keys, and, under autocast, the casts of the
    fp32 residual stream to bf16 before the products."""
    m, p = system.scenario.model, system.scenario.parallelism
    rb = w.residual_bytes
    width = tokens * m.d_model  # with sequence parallelism norms and adds are split over tp
    local = width / p.tp
    norm_f, norm_b = k.norm_s(local, rb)
    add = k.elementwise_s(1.5, local, rb)  # read two, write one
    heads = m.heads // p.tp
    kv_heads = max(1, m.kv_heads_resolved // p.tp) if m.attention != "mla" else heads
    q, kv = tokens * heads * m.head_dim_resolved, tokens * kv_heads * m.head_dim_resolved
    rope = 0.0
    if m.attention != "mla":  # MLA ropes only a narrow slice of each head
        rope = k.elementwise_s(ROPE_PASSES, q, BF16_BYTES) + k.elementwise_s(
            ROPE_PASSES, kv, BF16_BYTES
        )
    # the attention output, heads back to tokens: one copy before the output projection
    rope += k.elementwise_s(1.0, q, BF16_BYTES)
    qn_f = qn_b = 0.0
    if m.qk_norm:
        for n in (q, kv):
            f, b = k.norm_s(n, BF16_BYTES)
            qn_f, qn_b = qn_f + f, qn_b + b
    # under autocast: the residual stream cast down before the products, its gradient
    # cast back up in the backward
    cast_f = k.cast_s(width, rb, BF16_BYTES) if rb != BF16_BYTES else 0.0
    cast_b = k.cast_s(width, BF16_BYTES, rb) if rb != BF16_BYTES else 0.0
    attn_f = norm_f + qn_f + rope + add + cast_f
    attn_b = norm_b + qn_b + rope + add + cast_b
    ffn_f = norm_f + add + cast_f
    ffn_b = norm_b + add + cast_b
    return attn_f, attn_b, ffn_f, ffn_b


def block_costs(system: System, w: TrainingWorkload, cost: MoELayerCost) -> dict[str, BlockCost]:
    """Costs of an attention + MoE block and an attention + dense block, per micro-batch."""
    s = system.scenario
    m, p = s.model, s.parallelism
    rf = system.layer_costs.roofline
    k = step_kernels(system)
    tokens = w.seq_len * w.micro_batch_sequences  # per data-parallel rank
    f = figures(m)
    attn_params = f.attention_params_per_layer
    # the one attention cost serving uses too: every sequence computes seq_len new tokens
    # (the fused kernel at its measured rate); the backward from the measured step kernels
    profile = s.cluster.profile or s.cluster.accelerator.profile
    attn = AttentionCost(rf, m, p.tp, rate=measured_rate(profile))
    timed = attn.forward([(w.seq_len, 0)] * w.micro_batch_sequences)
    proj, scores_f = timed.projections_s, timed.scores_s
    flops = 2.0 * attn.width * causal_keys(w.seq_len, 0) * w.micro_batch_sequences
    scores_b = k.attention_bwd_s(flops, w.seq_len)
    attn_fwd = proj + scores_f
    attn_bwd = 2 * proj + scores_b
    if w.recompute == "selective":
        attn_bwd += scores_f
    g_attn_f, g_attn_b, g_ffn_f, g_ffn_b = _glue_s(k, system, w, tokens)
    attn_fwd += g_attn_f
    attn_bwd += g_attn_b
    tp_group = [system.layout.device(0, i) for i in range(p.tp)]
    act = tokens * m.d_model * w.residual_bytes  # the residual stream's width (fp32 under autocast)
    tp_pair = (
        (all_gather_s(system.paths, tp_group, act) + reduce_scatter_s(system.paths, tp_group, act))
        if p.tp > 1
        else 0.0
    )
    # MoE block: the per-layer path over the whole stage's tokens (every DP rank at once);
    # its backward: the expert products twice, the rest of the layer once more
    sample = cost.sample(tokens * p.dp)
    a = sample.comm_s
    c = sample.time_s - a
    products = min(c, _expert_products_s(system, tokens * p.ep))
    # padded experts: the backward reuses the forward's dispatch/combine masks (nothing
    # differentiates or rebuilds them), so their construction is not paid again
    padded = PaddedExperts.of(s.policies, m)
    masks = padded.masks_s(rf, tokens) if padded is not None else 0.0
    moe_fwd = _combine(a, c + g_ffn_f, w.overlap_a2a)
    moe_bwd = _combine(a, max(0.0, c - masks) + products + g_ffn_b, w.overlap_a2a)
    d_ff = (m.dense_d_ff or m.expert_d_ff) // p.tp
    dense_fwd = rf.dense_ffn_s(tokens, m.d_model, d_ff, m.dense_activation or m.activation)
    # autocast casts every weight a block multiplies to bf16 in each forward (fp32 -> bf16)
    # and each bf16 weight gradient to the fp32 master's gradient in backward
    cast = {"moe": (0.0, 0.0), "dense": (0.0, 0.0)}
    if w.weight_bytes != BF16_BYTES:
        wb = w.weight_bytes
        moe_params = (
            attn_params / p.tp
            + (m.experts // p.ep) * f.expert_params / p.etp
            + f.router_params_per_layer
            + f.shared_expert_params * m.shared_experts / p.tp
        )
        dense_params = (attn_params + f.dense_ffn_params) / p.tp
        cast = {
            key: (k.cast_s(n, wb, BF16_BYTES), k.cast_s(n, BF16_BYTES, wb))
            for key, n in (("moe", moe_params), ("dense", dense_params))
        }
    # ZeRO-3 keeps 1/group of each parameter: a block gathers its weights before its forward
    # and again before its backward (Rajbhandari et al. 2020, Sec. 5.3: 1.5x data-parallel
    # traffic); dense parameters over dp, experts over the expert-data-parallel group
    gather = {"moe": 0.0, "dense": 0.0}
    if w.zero_stage == 3:
        layout = system.layout
        wb = w.weight_bytes
        dense_group = [layout.device(0, d * p.tp) for d in range(p.dp)]
        expert_group = [layout.device(0, g * p.ep * p.etp) for g in range(layout.edp)]
        attn_bytes = wb * attn_params / p.tp
        expert_bytes = wb * (m.experts // p.ep) * f.expert_params / p.etp
        shared_bytes = wb * f.shared_expert_params * m.shared_experts / p.tp
        gather["moe"] = all_gather_s(system.paths, dense_group, attn_bytes + shared_bytes) + (
            all_gather_s(system.paths, expert_group, expert_bytes)
        )
        gather["dense"] = all_gather_s(
            system.paths, dense_group, attn_bytes + wb * f.dense_ffn_params / p.tp
        )
    out = {}
    for kind, (fwd, bwd, a2a, tp) in {
        "moe": (attn_fwd + moe_fwd + tp_pair, attn_bwd + moe_bwd + tp_pair, 2 * a, 2 * tp_pair),
        "dense": (
            attn_fwd + dense_fwd + g_ffn_f + 2 * tp_pair,
            attn_bwd + 2 * dense_fwd + g_ffn_b + 2 * tp_pair,
            0.0,
            4 * tp_pair,
        ),
    }.items():
        if w.recompute == "full":  # the forward reruns, with its collectives
            bwd += fwd
            a2a += a2a / 2
            tp += tp / 2
        g = gather[kind]
        cf, cb = cast[kind]
        out[kind] = BlockCost(fwd + g + cf, bwd + g + cb, a2a, tp, 2 * g)
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
    k = step_kernels(system)
    vocab = math.ceil(m.vocab_size / p.tp)
    head = float(rf.gemm_s(tokens, m.d_model, vocab))
    # the last stage: final norm, head, and the loss over the vocabulary (fp32 logits)
    norm_f, norm_b = k.norm_s(tokens * m.d_model / p.tp, w.residual_bytes)
    ce_f, ce_b = k.cross_entropy_s(tokens, vocab)
    head_f, head_b = head + norm_f + ce_f, 2 * head + norm_b + ce_b
    if w.weight_bytes != BF16_BYTES:  # autocast casts the head's weight, and its gradient
        head_f += k.cast_s(vocab * m.d_model, w.weight_bytes, BF16_BYTES)
        head_b += k.cast_s(vocab * m.d_model, BF16_BYTES, w.weight_bytes)
    act_bytes = tokens * m.d_model * w.residual_bytes / p.tp
    out = []
    for stage in range(p.pp):
        layers = range(stage * per_stage, min(m.layers, (stage + 1) * per_stage))
        picked = [blocks["moe" if i in moe else "dense"] for i in layers]
        fwd = sum(b.fwd_s for b in picked)
        bwd = sum(b.bwd_s for b in picked)
        if stage == p.pp - 1:
            fwd += head_f
            bwd += head_b
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
