"""The parallel layout made concrete: which device holds which tokens and which experts
(owns ``Layout`` and the expert load balancer ``eplb``; uses config only).

Rank order follows Megatron-Core: tp fastest, then dp, then pp; global rank == device id.
Inside a stage, expert parallelism reuses the same dp x tp ranks with etp fastest, then ep,
then expert-data-parallel (edp): local rank i has etp rank i % etp, ep rank
(i // etp) % ep and edp group i // (ep x etp). Every edp group holds a full copy of the
layer's experts, spread over its ep ranks by the placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.parallelism import ParallelismConfig


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism and the expert -> EP-rank placement of one model."""

    dp: int
    tp: int
    pp: int
    ep: int
    etp: int
    experts: int
    """Expert slots of a layer: the model's experts plus any redundant replicas."""
    owner: np.ndarray
    """EP rank holding each expert slot (int64, experts)."""

    @classmethod
    def of(cls, p: ParallelismConfig, experts: int, redundant: int = 0) -> Layout:
        """The layout of ``experts`` experts; with ``redundant`` replicas the layer has
        ``experts + redundant`` slots, contiguous on the EP ranks (``slots / ep`` each), and
        which expert fills each slot is the load balancer's (:mod:`moesim.layout.eplb`)."""
        if redundant:
            slots = experts + redundant
            owner = np.arange(slots, dtype=np.int64) // (slots // p.ep)
            return cls(p.dp, p.tp, p.pp, p.ep, p.etp, slots, owner)
        if isinstance(p.placement, list):
            owner = np.asarray(p.placement, dtype=np.int64)
        elif p.placement == "round_robin":
            owner = np.arange(experts, dtype=np.int64) % p.ep
        else:
            owner = np.arange(experts, dtype=np.int64) // (experts // p.ep)
        return cls(p.dp, p.tp, p.pp, p.ep, p.etp, experts, owner)

    @property
    def stage_ranks(self) -> int:
        """Ranks per pipeline stage (dp x tp)."""
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel groups per stage (full copies of the experts)."""
        return self.stage_ranks // (self.ep * self.etp)

    def device(self, stage: int, local: int) -> int:
        """Global device id of a stage-local rank."""
        return stage * self.stage_ranks + local

    def edp_group(self, local: int) -> int:
        """Which copy of the experts a stage-local rank's tokens are routed to."""
        return local // (self.ep * self.etp)

    def expert_devices(self, stage: int, group: int, ep_rank: int) -> list[int]:
        """The devices (one per etp shard) of EP rank ``ep_rank`` in edp group ``group``."""
        base = group * self.ep * self.etp + ep_rank * self.etp
        return [self.device(stage, base + x) for x in range(self.etp)]

    def local_experts(self, ep_rank: int) -> np.ndarray:
        """Expert ids held by an EP rank, ascending."""
        return np.flatnonzero(self.owner == ep_rank)

    def tokens_per_rank(self, tokens: int) -> np.ndarray:
        """Tokens held by each stage-local rank: split evenly over dp, then over tp
        (sequence parallelism, as Megatron requires for MoE with tp > 1)."""
        per_dp = np.array([len(a) for a in np.array_split(np.arange(tokens), self.dp)])
        out = np.zeros(self.stage_ranks, dtype=np.int64)
        for d, n in enumerate(per_dp):
            out[d * self.tp : (d + 1) * self.tp] = [
                len(a) for a in np.array_split(np.arange(n), self.tp)
            ]
        return out
