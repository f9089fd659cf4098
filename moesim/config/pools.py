"""Prefill/decode disaggregation (issue 16): ``workload.pools`` of a serving workload.

A prefill pool and a decode pool, each of ``instances`` identical serving instances. An
instance is one server as the co-located ``serving`` workload simulates it (``dp``
attention ranks of ``tp`` devices sharing expert-parallel MoE layers, its own scheduler
and KV cache) on its own whole nodes: ``parallelism.dp x tp`` devices. The prefill pool
takes the cluster's first nodes, the decode pool the next ones; together they may not
exceed the cluster. A request goes to a prefill instance, is prefilled (its first token
sampled), its KV cache is sent to a decode instance over the cluster's topology
(:mod:`moesim.engine.kv_transfer`), and the decode instance generates the rest.

```yaml
workload:
  kind: serving
  ...                                   # arrivals, lengths, SLO as co-located
  pools:
    prefill: {instances: 1, parallelism: {dp: 32, ep: 32, a2a: deepep}}
    decode:
      instances: 1
      parallelism: {dp: 144, ep: 144, a2a: deepep}
      scheduler: {max_seqs: 128}       # fields over the workload's scheduler
      micro_batches: 2                 # two-micro-batch overlap (1: none)
    prefix_cache_hit_fraction: 0.563    # prompt share found in a KV cache
    route: round_robin                  # or least_loaded
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.parallelism import ParallelismConfig


class SchedulerOverrides(Frozen):
    """A pool's scheduler fields over the workload's ``scheduler`` (None: the workload's)."""

    max_batch_tokens: int | None = Field(default=None, ge=1)
    """Tokens per iteration per data-parallel rank (vLLM ``max_num_batched_tokens``)."""
    max_seqs: int | None = Field(default=None, ge=1)
    """Sequences running at once per data-parallel rank (vLLM ``max_num_seqs``)."""
    chunked_prefill: bool | None = None
    """Split long prompts over iterations."""
    admit_free_fraction: float | None = Field(default=None, ge=0, lt=1)
    """Share of KV blocks that must stay free to admit a request beside others."""


class PoolConfig(Frozen):
    """One pool: identical serving instances, each on whole nodes of its own."""

    instances: int = Field(default=1, ge=1)
    """Serving instances in the pool (each ``parallelism.dp x tp`` devices)."""
    parallelism: ParallelismConfig
    """One instance's layout: dp attention ranks of tp devices, EP over them (pp = 1)."""
    scheduler: SchedulerOverrides = SchedulerOverrides()
    """Scheduler fields of this pool over the workload's ``scheduler``."""
    kv_cache_fraction: float | None = Field(default=None, gt=0, le=1)
    """Share of device memory after the weights holding KV; None: the workload's."""
    micro_batches: Literal[1, 2] = 1
    """2: every iteration runs as two micro-batches whose compute and all-to-all overlap on
    a two-stream timeline (DeepSeek's dual-batch overlap, :mod:`moesim.engine.dual_batch`);
    1: one batch, the all-to-all exposed."""


class PoolsConfig(Frozen):
    """Prefill/decode disaggregation: a prefill pool, a decode pool, how requests are
    routed to their instances."""

    prefill: PoolConfig
    """Prefills prompts: a request's first token is sampled here."""
    decode: PoolConfig
    """Receives a prefilled request's KV cache and generates the rest of its tokens."""
    prefix_cache_hit_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of every prompt found in a prefix (KV) cache: its first
    ``floor(fraction x prompt)`` tokens (at most prompt - 1) are not computed by the
    prefill, which loads their KV into its cache blocks and attends to them; they count as
    input tokens and their KV goes to decode with the rest (DeepSeek's on-disk KV cache:
    56.3% of input tokens hit it, Day 6, 2025-03-01)."""
    route: Literal["round_robin", "least_loaded"] = "round_robin"
    """How a request picks its instance and data-parallel rank in each pool: in turn, or
    the one with the least outstanding work (prefill: prompt tokens not yet prefilled;
    decode: requests not yet finished)."""
