"""The ``training`` workload: one training step of the whole model, simulated.

Per micro-batch and pipeline stage, the forward and backward costs of the stage's blocks
come from :mod:`moesim.cost.training` (the same cost models as every other workload). A
SimPy process per stage then runs the pipeline schedule (GPipe or 1F1B) with the real
dependencies (a forward needs the previous stage's forward and the activations' transfer;
a backward the next stage's backward), so the bubble emerges rather than being assumed.
After the flush come the gradient reductions (dense parameters over data parallelism,
experts over expert-data parallelism) and the optimizer.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from moesim.config.training import TrainingWorkload
from moesim.cost.collectives import all_reduce_s
from moesim.cost.offload import (
    ExpertStream,
    OptimizerOffload,
    expert_stream,
    offload_stages,
    optimizer_offload,
)
from moesim.cost.routed_layers import routed_training
from moesim.cost.training import StageCost, block_costs, stage_costs, step_kernels
from moesim.derived.serving_memory import serving_memory
from moesim.derived.training_memory import TrainingMemory, training_memory
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.routing.replay import RoutingUse
from moesim.system import System


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
    expert_stream: ExpertStream | None = None
    """Expert streaming per micro-batch pass (expert offloading), else None."""
    optimizer_offload: OptimizerOffload | None = None
    """ZeRO-Offload's host-side optimizer work for the device's shard, else None."""
    routed: RoutingUse | None = None
    """What a trace or logits routing handed out over every step's micro-batches, in order
    (None for popularity sampling)."""


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
    cost = simulated_layer_cost(system)
    # a trace or logits routing: every micro-batch of every step priced from its tokens
    moe_tokens = w.seq_len * w.micro_batch_sequences * p.dp
    routed = routed_training(system, cost, moe_tokens, w.steps * w.microbatches)
    blocks = block_costs(system, w, cost)
    stages = offload_stages(system, stage_costs(system, w, blocks))
    pipeline_s, ops, events = run_pipeline(stages, w.schedule, w.microbatches)
    off = s.policies.offload
    memory = training_memory(m, p, s.cluster.accelerator, w, off.optimizer, off.experts)
    # gradients: dense parameters over dp, experts over the expert-data-parallel group,
    # in the gradients' dtype (bf16, or fp32 under autocast); ZeRO 1-2 reduce-scatter then
    # all-gather them, which moves the bytes of one all-reduce
    dense_group = [system.layout.device(0, d * p.tp) for d in range(p.dp)]
    edp = system.layout.edp
    expert_group = [system.layout.device(0, g * p.ep * p.etp) for g in range(edp)]
    sm = serving_memory(m, p, s.cluster.accelerator)
    expert_params = sm.expert_weight_bytes // m.bytes_per_param
    dense_params = sm.other_weight_bytes // m.bytes_per_param
    sync = grad_sync_s(
        system,
        w,
        [(dense_group, w.grad_bytes * dense_params), (expert_group, w.grad_bytes * expert_params)],
        stages[0].bwd_s,
    )
    # optimizer: fused AdamW over this device's shard: read weight, gradient and states,
    # write weight and states
    shard_params = (
        (memory.optimizer + memory.offloaded_optimizer) / w.state_bytes
        if w.state_bytes
        else float(expert_params + dense_params)
    )
    per_param = 2 * w.weight_bytes + w.grad_bytes + 2 * w.state_bytes
    optimizer = step_kernels(system).optimizer_s(shard_params, per_param)
    host_opt = None
    if s.policies.offload.optimizer:  # ZeRO-Offload: the step runs on the host
        host_params = memory.offloaded_optimizer / w.state_bytes if w.state_bytes else 0.0
        host_opt = optimizer_offload(s, w, host_params)
        optimizer = optimizer_offload(s, w, shard_params).total_s
    tokens = p.dp * w.micro_batch_sequences * w.microbatches * w.seq_len
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
        expert_stream=expert_stream(s),
        optimizer_offload=host_opt,
        routed=routed,
    )


def grad_sync_s(
    system: System,
    w: TrainingWorkload,
    groups: list[tuple[list[int], float]],
    last_backward_s: float,
) -> float:
    """Exposed time of the gradient all-reduces after the last backward pass.

    ``flat``: each group's gradients in one buffer, all-reduced after the backward.
    ``bucketed`` (PyTorch DDP, Li et al., VLDB 2020; Megatron's gradient buffers): each
    group's gradients fill buckets of ``bucket_mb`` in reverse layer order as the last
    micro-batch's backward (``last_backward_s``) produces them, evenly over its length,
    and each bucket is all-reduced once full, one at a time on the network; only what is
    left when the backward ends is exposed (contention of the overlapped all-reduce with
    the backward's kernels is not modelled).
    """
    total = 0.0
    if w.grad_sync == "flat":
        for group, nbytes in groups:
            total += all_reduce_s(system.paths, group, nbytes, _algo(w, len(group)))
        return total
    bucket = w.bucket_mb * 1e6
    ready_parts, cost_parts = [], []
    for group, nbytes in groups:
        if len(group) <= 1 or nbytes <= 0:
            continue
        # every layer holds both kinds of parameter, so each group's gradients appear
        # evenly over the backward; a bucket is ready once its last gradient is. Equal
        # buckets cost one all-reduce each (priced once), the last one its remainder.
        full, rest = divmod(nbytes, bucket)
        n = int(full) + (1 if rest > 0 else 0)
        done = np.minimum(np.arange(1, n + 1) * bucket, nbytes)
        ready_parts.append(last_backward_s * done / nbytes)
        cost = np.full(n, all_reduce_s(system.paths, group, bucket, _algo(w, len(group))))
        if rest > 0:
            cost[-1] = all_reduce_s(system.paths, group, rest, _algo(w, len(group)))
        cost_parts.append(cost)
    if not ready_parts:
        return 0.0
    ready = np.concatenate(ready_parts)
    cost = np.concatenate(cost_parts)
    order = np.argsort(ready, kind="stable")
    ready, cost = ready[order], cost[order]
    # one bucket at a time on the network: the last finishes at max_i(ready_i + the
    # durations of bucket i and every later one)
    finish = float(np.max(ready + np.cumsum(cost[::-1])[::-1]))
    return max(0.0, finish - last_backward_s)


def _algo(w: TrainingWorkload, group: int) -> Any:
    """The configured all-reduce algorithm, or ring where it needs a power-of-two group."""
    if w.grad_all_reduce != "ring" and group & (group - 1):
        return "ring"
    return w.grad_all_reduce
