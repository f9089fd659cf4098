"""Offloading: experts kept below HBM (host DRAM, NVMe) and loaded on demand, and the
optimizer states of training kept on the host (ZeRO-Offload).

Experts live in tiers: a per-device HBM expert cache, host DRAM and NVMe. A token routed
to an expert that is not in HBM stalls its layer until the expert's weights arrive over the
device's host link (PCIe); see :mod:`moesim.cost.offload` for the timing model and the
catalog values it uses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen


class PrefetchConfig(Frozen):
    """Load the next MoE layer's likely experts while the current layer runs."""

    accuracy: float = Field(ge=0, le=1)
    """Probability that each expert the next layer will use is among the predicted ones; the
    predictor names as many experts as the next layer uses on the device, the wrong guesses
    are other experts of that device (their copies waste bandwidth and cache slots)."""


class ExpertOffloadConfig(Frozen):
    """An HBM cache of experts per device; the other experts live in host DRAM or NVMe."""

    policy: Literal["static", "lru", "lfu"]
    """static: the hottest experts (by the run's routing popularity at time 0) are pinned
    and one layer's worth of slots streams the rest; lru: every miss stays, evicting the
    least recently used; lfu: uses are counted for every expert, resident or not (layer
    executions that used it, over the run), and a miss stays only if its count exceeds
    that of the least frequently used resident expert, which it then evicts (else it
    streams through the staging buffer like a static miss), so under stationary routing
    the cache converges to the most used experts."""
    cache_experts: int | None = Field(default=None, ge=1)
    """HBM cache capacity per device, in experts (one expert of one MoE layer, the device's
    etp shard of it); exactly one of cache_experts and cache_gib. At most the experts the
    device holds, ``MoE blocks (of its pipeline stage) x experts / ep``, which keeps every
    expert resident (no copies); a larger cache is rejected at load time (not clamped:
    it usually means a cache sized for the whole model instead of one device)."""
    cache_gib: float | None = Field(default=None, gt=0)
    """HBM cache capacity per device, GiB (rounded down to whole experts); exactly one of
    cache_experts and cache_gib. At least one expert and at most the device's experts, as
    for cache_experts."""
    prefetch: PrefetchConfig | None = None
    """Prefetch of the next layer's predicted experts; null = load on demand only."""
    overlap: bool = True
    """Copies run on the GPU's copy engine alongside computation (a layer's misses load
    while its resident experts compute); false: a layer computes only once all its
    missing experts have arrived."""
    host_memory: Literal["pinned", "pageable"] = "pinned"
    """Host buffers of the offloaded experts: pinned copies run at the host link's rate,
    pageable ones at the measured pageable/pinned ratio of it."""
    dram_gib: float | None = Field(default=None, gt=0)
    """Host DRAM per host given to experts, GiB; the experts that do not fit live on NVMe
    (DRAM then caches them with the same policy). null = every expert lives in DRAM."""

    @model_validator(mode="after")
    def _one_capacity(self) -> ExpertOffloadConfig:
        if (self.cache_experts is None) == (self.cache_gib is None):
            raise ValueError("give exactly one of cache_experts and cache_gib")
        return self


class OffloadConfig(Frozen):
    """What lives below device memory: experts (serving), optimizer states (training)."""

    experts: ExpertOffloadConfig | None = None
    """Expert offloading with an HBM expert cache (serving; in training the uncached
    experts stream in every pass, which needs ``optimizer: true``); null = all in HBM."""
    optimizer: bool = False
    """ZeRO-Offload (Ren et al., USENIX ATC 2021), training only: fp32 optimizer states and
    the Adam step live on the host; gradients go device-to-host and updated bf16 weights
    host-to-device over the host link each step."""
