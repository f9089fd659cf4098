"""Offloading: an HBM expert cache per device fed from host DRAM / NVMe (serving; streamed
experts in training), and the optimizer step on the host (ZeRO-Offload, training).

**Tiers and rates.** Each device owns ``experts / ep`` experts of every MoE block (its etp
shard of each). An HBM cache holds ``cache`` of them (``policies.offload.experts``; at most
all of them, which the config rules enforce, and then nothing is ever copied); every
expert also lives in host DRAM, or, when ``dram_gib`` caps the DRAM given to experts, on
NVMe with DRAM caching the rest under the same policy. Copying one expert takes

``latency + expert_bytes / rate``

with the host link's one-hop latency (``latency_us`` of the accelerator's ``host_link``
preset) and per-device rates (all devices of a host load in the same layer, since EP
ranks run in lock-step, so they share the host's DRAM and NVMe bandwidth):

- DRAM -> HBM: ``min(link, host.dram_bandwidth_gbps / devices_per_host)``, where ``link``
  is the host link's measured rate where the catalog has it, else its datasheet rate
  (:func:`moesim.topology.graph.rate`; PCIe Gen5 x16: 55 GB/s measured pinned on H100),
  times :func:`pageable_fraction` for pageable host buffers;
- NVMe -> HBM: ``min(the DRAM rate, host.nvme_read_gbps / devices_per_host)``.

**Which experts an iteration touches.** For each MoE block in order, the iteration's
tokens (split evenly over the expert-data-parallel groups; one group is simulated, the
others behave alike) choose ``top_k`` experts each by Gumbel-top-k from the run's
popularity (the same ``"popularity"`` stream as the expected layer cost), rotated by the
routing ``drift`` at the iteration's start time. Sampling is vectorized over blocks and
stops as soon as every expert of a block is touched (more tokens cannot change the set);
beyond 128 tokens a block's still-untouched (rare) experts are drawn from their per-token
inclusion probability (:func:`touched_experts`).

**Cache policies.** The cache is split evenly over the MoE blocks (as Mixtral-
offloading, Eliseev & Mazur 2023, keeps k experts per layer: one cache over all blocks,
visited cyclically, would evict each block's experts just before they come round again).
At start-up each part is filled hottest first (a server loads its weights before
serving), so a cache that holds every expert never misses. ``lru`` admits every miss
and evicts the block's least recently used expert. ``lfu`` counts the layer executions
that used each expert over the whole run, resident or not ("perfect" LFU), and admits a
miss only when its count exceeds that of the block's least frequently used resident
expert (ties by recency), which it evicts: admitting every miss would, in a part of one
or two slots, evict a hot expert for each cold one a layer touches (the hot one is
fetched back the next time), so LFU would thrash like LRU; with the admission test the
cache converges to each block's most used experts, i.e. to ``static`` under stationary
routing (under drift it follows the moving hot set only as the new hot experts' run
counts overtake the old ones'). ``static`` pins each block's hottest experts
(popularity at time 0) and never evicts. Misses that do not stay (static, an LFU miss
not admitted, or a part smaller than the layer's need) stream through staging buffers
of one block's experts (two with prefetch: the current and the next block), which
:mod:`moesim.derived.serving_memory` counts in HBM. Experts the current layer needs are
not evicted for its own misses or prefetches while others can go; the DRAM tier under a
``dram_gib`` cap is split and managed the same way.

**Timing of one iteration** (per device; the layer ends on the slowest device, as the EP
all-to-all couples them). Layer ``l`` starts its MoE part at ``c`` (after attention), and
its MoE time ``m`` is that of the expected-cost model, split evenly over the experts it
touches on the device. Misses are copied one after another on the copy engine from
``max(c, copy engine free)``; a resident expert is ready at ``c`` (or when its prefetch
lands). With ``overlap``, experts compute in order of readiness, each as soon as it is
ready and the previous one is done, so resident experts hide the misses' copies; without
it, the layer computes only once all have arrived. With ``prefetch``, at ``c`` the device
also queues copies of the experts it predicts for the next MoE block (each used expert is
predicted with probability ``accuracy``; the wrong guesses are other experts of the
device), which land in the cache behind this layer's misses; the first MoE block's
predictions are queued at the start of the iteration, during the first attention. The
stall of a layer is its end minus ``c + m``; the iteration's stall is the sum over
layers, added to its time.

**Counting uses.** Each use (one expert of one layer on one device) is exactly one of: an
HBM hit (the expert is in HBM at ``c``: resident, or prefetched and landed), in flight (a
prefetch of it is still being copied at ``c``: the use waits for it, so it is no hit),
a DRAM miss or an NVMe miss (a demand copy); ``hit_rate`` gives their shares, which add
to 1, and only the last three can stall a layer.

**Training.** A micro-batch of thousands of tokens uses every expert, so a stage's device
copies all its uncached experts in for each forward and each backward pass (their bf16
gradients leave over the other direction of the link meanwhile); with ``overlap`` only the
copy time beyond the pass's own time adds (:func:`offload_stages`). The streamed experts'
optimizer states and update live on the host, so this requires ZeRO-Offload
(:func:`optimizer_offload`): gradients out, a CPU Adam step at host DRAM bandwidth,
weights back in, once per step.
"""

from moesim.cost.offload.experts import (
    EXACT_TOKENS,
    ExpertOffload,
    NoOffload,
    OffloadTotals,
    Partitioned,
    Tier,
    expert_offload,
    touched_experts,
)
from moesim.cost.offload.tiers import MEASUREMENTS, TierRates, pageable_fraction, tier_rates
from moesim.cost.offload.training import (
    ExpertStream,
    OptimizerOffload,
    expert_stream,
    offload_stages,
    optimizer_offload,
)

__all__ = [
    "EXACT_TOKENS",
    "MEASUREMENTS",
    "ExpertOffload",
    "ExpertStream",
    "NoOffload",
    "OffloadTotals",
    "OptimizerOffload",
    "Partitioned",
    "Tier",
    "TierRates",
    "expert_offload",
    "expert_stream",
    "offload_stages",
    "optimizer_offload",
    "pageable_fraction",
    "tier_rates",
    "touched_experts",
]
