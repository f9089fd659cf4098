"""The KV cache of a prefilled request sent from a prefill instance to a decode instance
(prefill/decode disaggregation, issue 16): bytes from the model's KV shape, time over the
cluster's topology.

Bytes: every layer's KV of the prompt, ``layers x prompt x`` the per-device KV bytes per
token and layer (:func:`moesim.derived.serving_memory.kv_bytes_per_token_per_layer`):
MLA's compressed latent plus its rotary key (``kv_lora_rank + qk_rope_head_dim`` values,
whole on every tensor-parallel device), or the device's ``kv_heads / tp`` heads of keys
and values. Each of the source rank's ``tp`` devices sends its own shard to the
destination rank's device of the same tensor-parallel index, all at once (MLA: one
device sends the latent, the copies are identical), as Mooncake / NIXL transfer engines
do (RDMA writes from the device holding each block).

Time of one shard: ``latency + bytes / bottleneck bandwidth`` of its route (the links'
and switches' latency, the slowest link's rate); the transfer takes its slowest shard.
Flows of different requests sharing links are not modelled here (a request's shards use
disjoint rails on a rail-optimized fabric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.model import ModelConfig
from moesim.derived.serving_memory import kv_bytes_per_token_per_layer
from moesim.topology.paths import PathTable
from moesim.units import gbps


def kv_transfer_bytes(m: ModelConfig, prompt_tokens: int, tp: int) -> int:
    """Bytes one source device sends for a request's prompt (its KV shard, every layer)."""
    return m.layers * prompt_tokens * kv_bytes_per_token_per_layer(m, tp)


@dataclass(frozen=True)
class KvRoute:
    """The routes of a request's KV shards from prefill to decode devices."""

    latency_s: float
    """The slowest shard route's latency."""
    seconds_per_byte: float
    """1 / the slowest shard route's bottleneck rate."""

    def time_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.seconds_per_byte


def kv_route(paths: PathTable, src: list[int], dst: list[int]) -> KvRoute:
    """The shard routes from the source rank's devices ``src`` to the destination's
    ``dst``: every destination device receives its shard (MLA: the whole latent, which
    every tensor-parallel device keeps) from source ``j mod len(src)``, so prefill and
    decode may use different tensor parallelism; the shards travel in parallel (sharing
    links is not modelled)."""
    pairs = [(src[j % len(src)], d) for j, d in enumerate(dst)]
    worst_lat, worst_spb = 0.0, 0.0
    for s, d in pairs:
        if s == d:
            continue
        edges = paths.edge_ids(s, d)
        rate = gbps(float(np.min(paths.bandwidth_gbps[edges])))
        worst_lat = max(worst_lat, paths.latency_s(s, d))
        worst_spb = max(worst_spb, 1.0 / rate)
    return KvRoute(worst_lat, worst_spb)


def kv_transfer_s(
    paths: PathTable, m: ModelConfig, prompt_tokens: int, src: list[int], dst: list[int]
) -> float:
    """Seconds to move a request's prompt KV from devices ``src`` (the prefill rank's tp
    group) to ``dst`` (the decode rank's), both in the cluster's device ids: each
    destination device's shard (the decode rank's tensor parallelism decides its size)."""
    route = kv_route(paths, src, dst)
    return route.time_s(kv_transfer_bytes(m, prompt_tokens, len(dst)))
