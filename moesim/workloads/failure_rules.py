"""Failure rules of the workload kinds that model failures: training runs restart from
checkpoints; serving recovers by replicas (which must fit beside the KV cache) or rerouting."""

from __future__ import annotations

import math

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.derived import replica_memory
from moesim.derived.model_figures import figures
from moesim.derived.serving_memory import serving_memory
from moesim.units import GIB
from moesim.workloads.base import Rule


def _replicas(replicas: int | list[int]) -> int:
    return len(replicas) if isinstance(replicas, list) else replicas


def training_failures(s: Scenario, w: TrainingWorkload) -> Rule:
    """A training run with failures has a length and restarts from checkpoints."""
    f = s.failures
    if f is None:
        return
    n_reps = _replicas(f.recovery.replicas)
    if w.duration_s is None:
        yield (
            "workload.duration_s",
            "required with a failures section: the length of the training run, seconds",
        )
    if n_reps:
        yield (
            "failures.recovery.replicas",
            "a training job restarts from its checkpoint after any failure; expert "
            "replicas apply to serving",
        )
    ck = f.checkpoint
    if ck is not None and ck.write_gbps is None and s.cluster.host.nvme_write_gbps <= 0:
        yield (
            "failures.checkpoint.write_gbps",
            "required: the cluster's hosts have no NVMe to write checkpoints to "
            "(host.nvme_write_gbps is 0)",
        )


def serving_failures(s: Scenario, w: ServingWorkload) -> Rule:
    """Serving recovers by replicas (which must fit) or rerouting; no checkpoints."""
    f = s.failures
    if f is None:
        return
    m, p, rec = s.model, s.parallelism, f.recovery
    n_reps = _replicas(rec.replicas)
    if f.checkpoint is not None:
        yield "failures.checkpoint", "checkpoint-restart applies to training workloads"
    if rec.on_expert_loss == "replica" and not n_reps:
        yield (
            "failures.recovery.replicas",
            "on_expert_loss 'replica' needs replicas: a count of the most popular experts "
            "or a list of expert ids",
        )
    if not n_reps:
        return
    ids = rec.replicas if isinstance(rec.replicas, list) else []
    if any(e >= m.experts for e in ids) or n_reps > m.experts:
        return  # reported by the common failure rule; no replica memory to price
    if p.ep < 2:
        yield (
            "failures.recovery.replicas",
            f"a replica lives on the next EP rank: needs parallelism.ep >= 2, got {p.ep}",
        )
        return
    if m.experts % p.ep or p.pp != 1:
        return
    replica_bytes = replica_memory.replica_bytes(s)
    per_rank = replica_bytes // max(1, expert_stack_bytes(s))
    mem = serving_memory(m, p, s.cluster.accelerator, s.policies.offload.experts)
    acc = s.cluster.accelerator
    if mem.weight_bytes >= mem.device_bytes:
        return  # reported by the serving rule
    left = mem.device_bytes - mem.weight_bytes - replica_bytes
    kv_tokens = math.floor(w.kv_cache_fraction * max(0, left)) // max(1, mem.kv_bytes_per_token)
    if left <= 0 or kv_tokens < w.scheduler.block_tokens:
        yield (
            "failures.recovery.replicas",
            f"the replicas do not fit: {per_rank} replica expert(s) per device take "
            f"{replica_bytes / GIB:.1f} GiB on top of {mem.weight_bytes / GIB:.1f} GiB of "
            f"weights, and each {acc.name} has {mem.device_bytes / GIB:.1f} GiB (no room "
            "left for a KV block); replicate fewer experts or raise ep",
        )


def expert_stack_bytes(s: Scenario) -> int:
    """One expert's weights over the MoE blocks of a stage, on one device."""
    f, p = figures(s.model), s.parallelism
    blocks = math.ceil(f.moe_layers / p.pp)
    return blocks * math.ceil(f.expert_params / p.etp) * s.model.bytes_per_param
