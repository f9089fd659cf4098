"""Memory of standby expert replicas (``failures.recovery.replicas``).

The replica of expert ``e`` sits on the next EP rank, ``(owner(e) + 1) % ep``, of the same
expert-data-parallel group, and holds the expert's weights in every MoE block of the
stage (its ``etp`` shard on each of the rank's devices), as the expert itself does
(:mod:`moesim.derived.serving_memory`). The busiest device pays for the most replicas.
"""

from __future__ import annotations

import math

import numpy as np

from moesim import rng
from moesim.config.scenario import Scenario
from moesim.derived.model_figures import figures
from moesim.layout import Layout
from moesim.routing.distributions import popularity


def replica_experts(s: Scenario) -> list[int]:
    """The experts that get a replica, in column order: the N most popular (the routing's
    popularity for the scenario's seed), or the listed ids."""
    cfg = s.failures
    if cfg is None:
        return []
    r = cfg.recovery.replicas
    if isinstance(r, list):
        return list(r)
    if r <= 0:
        return []
    pop = popularity(s.routing, s.model.experts, rng.stream(s.seed, "popularity"))
    return [int(e) for e in np.argsort(-pop, kind="stable")[: min(r, s.model.experts)]]


def replica_owner(owner: np.ndarray, replicas: list[int], ep: int) -> np.ndarray:
    """EP rank of each replica (int64, in column order)."""
    return ((owner[replicas] + 1) % ep).astype(np.int64)


def replica_bytes(s: Scenario) -> int:
    """Bytes of replica weights on the busiest device (0 without replicas)."""
    reps = replica_experts(s)
    p, m = s.parallelism, s.model
    if not reps or p.ep < 2 or m.experts % p.ep:
        return 0
    owner = Layout.of(p, m.experts).owner
    if isinstance(p.placement, list) and len(p.placement) != m.experts:
        return 0  # an invalid placement is reported by its own rule
    per_rank = int(np.bincount(replica_owner(owner, reps, p.ep), minlength=p.ep).max())
    f = figures(m)
    blocks = math.ceil(f.moe_layers / p.pp)
    return per_rank * blocks * math.ceil(f.expert_params / p.etp) * m.bytes_per_param
