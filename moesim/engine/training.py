"""The ``training`` workload: one training step of the whole model, simulated.

Per micro-batch and pipeline stage, the forward and backward costs of the stage's blocks
come from the same cost models as every other workload: attention and dense FFNs from the
device's cost model (:class:`moesim.cost.compute.Roofline`), MoE blocks from the per-layer
path (:class:`moesim.engine.layer_cost.MoELayerCost`: routing, all-to-all over the
topology, experts, combine), tensor-parallel collectives from
:mod:`moesim.cost.collectives`. A SimPy process per stage then runs the pipeline schedule
(GPipe or 1F1B) with the real dependencies (a forward needs the previous stage's forward
and the activations' transfer; a backward the next stage's backward), so the bubble
emerges rather than being assumed. After the flush come the gradient reductions (dense
parameters over data parallelism, experts over expert-data parallelism) and the optimizer.

Conventions: backward costs twice the forward's products (input and weight gradients) and
the same all-to-all bytes as the forward (dispatch and combine, reversed); attention scores
cost 2.5x in backward (FlashAttention-2, Dao 2023); causal attention computes half the
score matrix. Full recomputation reruns each block's forward during backward; selective
reruns the attention scores. With ``overlap_a2a`` a block's all-to-all (a) and compute (c)
run as a two-stage pipeline over two half micro-batches: (a + c) / 2 + max(a, c) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from moesim.config.training import TrainingWorkload
from moesim.cost.collectives import all_gather_s, all_reduce_s, reduce_scatter_s
from moesim.derived.model_figures import figures
from moesim.derived.serving_memory import serving_memory
from moesim.derived.training_memory import TrainingMemory, training_memory
from moesim.engine.layer_cost import MoELayerCost
from moesim.engine.offload import offload_stages, optimizer_offload
from moesim.system import System


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


@dataclass
class TrainingRecords:
    """What one simulated step produced."""

    step_s: float
    pipeline_s: float
    grad_sync_s: float
    optimizer_s: float
    stages: list[StageCost]
    memory: TrainingMemory
    tokens_per_step: int
    dropped_fraction: float
    layer_evaluations: int
    sim_events: int
    ops: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    """(stage, 'F' or 'B', micro-batch, start_s, end_s) of every pipeline operation."""
    layer_sim_events: int = 0
    """SimPy events of the MoE layer simulations behind the layer costs (for benchmarks)."""
    moe_link_bytes: np.ndarray | None = None
    """Bytes each topology edge carries in one step's MoE all-to-alls: every MoE layer's
    dispatch and combine, forward and backward (and the recomputed forward with full
    recomputation), per micro-batch; each stage's layers on stage 0's links (the stages'
    fabrics are alike)."""


def _combine(a: float, c: float, overlap: bool) -> float:
    return (a + c) / 2 + max(a, c) / 2 if overlap else a + c


def block_costs(system: System, w: TrainingWorkload, cost: MoELayerCost) -> dict[str, BlockCost]:
    """Costs of an attention + MoE block and an attention + dense block, per micro-batch."""
    s = system.scenario
    m, p = s.model, s.parallelism
    rf = system.layer_costs.roofline
    tokens = w.seq_len * w.micro_batch_sequences  # per data-parallel rank
    f0 = figures(m)
    attn_params = f0.attention_params_per_layer
    n_attn = max(1, m.layers)
    scores_per_token = (
        (figures(m, w.seq_len).flops_per_token_forward - f0.flops_per_token_forward) / n_attn / 2
    )  # causal: half the matrix
    b = rf.bytes_per_element
    proj = float(
        rf.product_s(
            2.0 * tokens * attn_params / p.tp, b * (attn_params / p.tp + 4 * tokens * m.d_model)
        )
    )
    scores = float(
        rf.product_s(scores_per_token * tokens / p.tp, b * 4 * tokens * m.d_model / p.tp)
    )
    attn_fwd = proj + scores
    attn_bwd = 2 * proj + 2.5 * scores
    if w.recompute == "selective":
        attn_bwd += scores
    tp_group = [system.layout.device(0, i) for i in range(p.tp)]
    act = tokens * m.d_model * 2
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
        f = figures(m)
        layout = system.layout
        dense_group = [layout.device(0, d * p.tp) for d in range(p.dp)]
        expert_group = [layout.device(0, g * p.ep * p.etp) for g in range(layout.edp)]
        attn_bytes = 2 * attn_params / p.tp
        expert_bytes = 2 * (m.experts // p.ep) * f.expert_params / p.etp
        shared_bytes = 2 * f.shared_expert_params * m.shared_experts / p.tp
        gather["moe"] = all_gather_s(system.paths, dense_group, attn_bytes + shared_bytes) + (
            all_gather_s(system.paths, expert_group, expert_bytes)
        )
        gather["dense"] = all_gather_s(
            system.paths, dense_group, attn_bytes + 2 * f.dense_ffn_params / p.tp
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
    act_bytes = tokens * m.d_model * 2 / p.tp
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
            bw = float(system.paths.bandwidth_gbps[path].min()) * 1e9 if len(path) else math.inf
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


def schedule(kind: str, stages: int, stage: int, microbatches: int) -> list[tuple[str, int]]:
    """The order of forward ('F') and backward ('B') micro-batch operations on a stage."""
    if kind == "gpipe":
        return [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]
    warmup = min(stages - stage - 1, microbatches)
    ops = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while b < microbatches:
        if f < microbatches:
            ops.append(("F", f))
            f += 1
        ops.append(("B", b))
        b += 1
    return ops


def run_pipeline(
    stages: list[StageCost], kind: str, microbatches: int
) -> tuple[float, list[tuple[int, str, int, float, float]], int]:
    """Simulate the schedule; returns the flush time, the operations and the events."""
    env = simpy.Environment()
    n = len(stages)
    done = {(op, s, i): env.event() for op in "FB" for s in range(n) for i in range(microbatches)}
    ops: list[tuple[int, str, int, float, float]] = []

    finished_at: dict[tuple[str, int, int], float] = {}

    def arrival(key: tuple[str, int, int], delay: float) -> Generator[simpy.Event, Any, None]:
        """Wait until the result of ``key`` has been produced and sent (``delay`` after)."""
        yield done[key]
        wait = finished_at[key] + delay - env.now
        if wait > 0:
            yield env.timeout(wait)

    def stage_proc(s: int) -> Generator[simpy.Event, Any, None]:
        for op, i in schedule(kind, n, s, microbatches):
            if op == "F" and s > 0:
                yield from arrival(("F", s - 1, i), stages[s - 1].p2p_s)
            if op == "B":
                yield done[("F", s, i)]
                if s < n - 1:
                    yield from arrival(("B", s + 1, i), stages[s].p2p_s)
            start = env.now
            yield env.timeout(stages[s].fwd_s if op == "F" else stages[s].bwd_s)
            ops.append((s, op, i, start, env.now))
            finished_at[(op, s, i)] = env.now
            done[(op, s, i)].succeed()

    procs = [env.process(stage_proc(s)) for s in range(n)]
    steps = 0
    finished = env.all_of(procs)
    while not finished.triggered:
        env.step()
        steps += 1
    return float(env.now), ops, steps


def simulate_training(system: System, w: TrainingWorkload) -> TrainingRecords:
    """One training step (forward/backward of every micro-batch, sync, optimizer)."""
    s = system.scenario
    m, p = s.model, s.parallelism
    cost = MoELayerCost(system)
    blocks = block_costs(system, w, cost)
    stages = offload_stages(system, stage_costs(system, w, blocks))
    pipeline_s, ops, events = run_pipeline(stages, w.schedule, w.microbatches)
    off = s.policies.offload
    memory = training_memory(m, p, s.cluster.accelerator, w, off.optimizer, off.experts)
    # gradients: dense parameters over dp, experts over the expert-data-parallel group
    dense_group = [system.layout.device(0, d * p.tp) for d in range(p.dp)]
    edp = system.layout.edp
    expert_group = [system.layout.device(0, g * p.ep * p.etp) for g in range(edp)]
    # bf16 gradients of this device's parameters (ZeRO 1-2 reduce-scatter then all-gather
    # them, which moves the bytes of one all-reduce)
    sm = serving_memory(m, p, s.cluster.accelerator)
    expert_grad = 2 * sm.expert_weight_bytes // m.bytes_per_param
    dense_grad = 2 * sm.other_weight_bytes // m.bytes_per_param
    sync = all_reduce_s(system.paths, dense_group, dense_grad, _algo(w, len(dense_group)))
    sync += all_reduce_s(system.paths, expert_group, expert_grad, _algo(w, len(expert_group)))
    # optimizer: read weights, gradients and states, write weights and states, per shard
    shard_params = (
        (memory.optimizer + memory.offloaded_optimizer) / w.optimizer_bytes_per_param
        if w.optimizer_bytes_per_param
        else (expert_grad + dense_grad) / 2
    )
    rf = system.layer_costs.roofline
    per_param = 2 + 2 + 2 * w.optimizer_bytes_per_param + 2
    optimizer = float(rf.memory_s(shard_params * per_param))
    if s.policies.offload.optimizer:  # ZeRO-Offload: the step runs on the host
        optimizer = optimizer_offload(s, w, shard_params).total_s
    tokens = p.dp * w.micro_batch_sequences * w.microbatches * w.seq_len
    moe_tokens = w.seq_len * w.micro_batch_sequences * p.dp
    return TrainingRecords(
        step_s=pipeline_s + sync + optimizer,
        pipeline_s=pipeline_s,
        grad_sync_s=sync,
        optimizer_s=optimizer,
        stages=stages,
        memory=memory,
        tokens_per_step=tokens,
        dropped_fraction=cost.sample(moe_tokens).dropped_fraction,
        layer_evaluations=cost.evaluations,
        sim_events=events,
        ops=ops,
        layer_sim_events=cost.sim_events,
        moe_link_bytes=cost.link_bytes(moe_tokens)
        * len(m.moe_layer_indices)
        * (3 if w.recompute == "full" else 2)
        * w.microbatches,
    )


def _algo(w: TrainingWorkload, group: int) -> Any:
    """The configured all-reduce algorithm, or ring where it needs a power-of-two group."""
    if w.grad_all_reduce != "ring" and group & (group - 1):
        return "ring"
    return w.grad_all_reduce
