"""Device memory of a served model: weights per device and the KV cache they leave room for.

Pure functions of the model shape and the parallel layout, no I/O.

**Weights per device.** Routed experts are split over expert parallelism: every device
holds ``experts / ep`` experts of each MoE block of its pipeline stage, each expert cut
into ``etp`` shards (expert-data-parallel groups hold full copies, so dp does not divide
them). Everything else (attention, dense FFNs, shared experts, routers, norms,
embedding and output head) is split over tensor parallelism, as Megatron-LM and vLLM
shard attention heads, FFN columns and the vocabulary (norms and routers, under 0.1% of
any preset, are counted as split too). Pipeline stages hold ``1/pp`` of the blocks.

**KV cache per token** (PagedAttention, Kwon et al., SOSP 2023), per device, summed over
the blocks of the stage, at the model's ``kv_cache_dtype`` (by default its ``dtype``):

- MHA / GQA: ``2 (K and V) x kv_heads_per_device x head_dim x bytes`` per block, where
  ``kv_heads_per_device = max(1, kv_heads // tp)``: heads are split over TP and replicated
  when tp > kv_heads (vLLM ``get_num_kv_heads``);
- MLA: ``(kv_lora_rank + qk_rope_head_dim) x bytes`` per block: the compressed latent
  and the shared rotary key (DeepSeek-V2, arXiv:2405.04434, Sec. 2.1.2); it is not
  split over TP: every TP rank keeps the whole latent, as vLLM's MLA backends do.

**Expert offloading** (``policies.offload.experts``): HBM holds the non-expert weights
plus an expert cache of ``cache_experts`` experts (or ``cache_gib`` rounded down to whole
experts) and staging buffers for streamed experts, one block's experts of the device (two
with prefetch), never more than the device's own experts in all; the rest of the device's
experts live in host DRAM / NVMe (:mod:`moesim.cost.offload`).

**KV capacity** per device = ``kv_cache_fraction x (memory - weights per device)``; a
data-parallel rank's TP group holds one cache, each device its share of every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moesim.config.cluster import ClusterConfig, NodesCluster
from moesim.config.hardware import AcceleratorSpec
from moesim.config.model import ModelConfig
from moesim.config.offload import ExpertOffloadConfig
from moesim.config.parallelism import ParallelismConfig
from moesim.derived.model_figures import figures
from moesim.units import BYTES_PER_ELEMENT, GIB


@dataclass(frozen=True)
class ServingMemory:
    """Per-device memory figures of one model on one layout and accelerator, bytes."""

    device_bytes: int
    """Memory of one device usable by software (measured where known, else marketed)."""
    expert_weight_bytes: int
    """Routed-expert weights on one device."""
    other_weight_bytes: int
    """All other weights on one device (attention, dense FFNs, embeddings, ...)."""
    kv_bytes_per_token: int
    """KV cache of one token on one device, over the blocks of its stage."""
    expert_bytes: int = 0
    """One expert of one MoE block on one device (its etp shard)."""
    device_experts: int = 0
    """Experts the device owns over all MoE blocks of its stage (blocks x experts / ep)."""
    cache_experts: int | None = None
    """With expert offloading: experts the HBM cache holds (None: all resident)."""
    staging_experts: int = 0
    """With expert offloading: slots of the staging buffers for streamed experts."""

    @property
    def offloaded_expert_bytes(self) -> int:
        """Bytes of the device's experts that live below HBM (0 without offloading)."""
        return self.device_experts * self.expert_bytes - self.expert_weight_bytes

    @property
    def weight_bytes(self) -> int:
        """All weights on one device."""
        return self.expert_weight_bytes + self.other_weight_bytes

    def kv_bytes(self, kv_cache_fraction: float) -> int:
        """Bytes of one device given to KV blocks (0 when the weights do not fit)."""
        return max(0, math.floor(kv_cache_fraction * (self.device_bytes - self.weight_bytes)))

    def kv_blocks(self, kv_cache_fraction: float, block_tokens: int) -> int:
        """KV blocks of one data-parallel rank (its TP group shares each block)."""
        tokens = self.kv_bytes(kv_cache_fraction) // self.kv_bytes_per_token
        return int(tokens // block_tokens)


def kv_bytes_per_token_per_layer(m: ModelConfig, tp: int) -> int:
    """KV bytes of one token in one attention block on one device (see module docstring)."""
    if m.attention == "mla":
        if m.kv_lora_rank is None or m.qk_rope_head_dim is None:
            raise ValueError("MLA needs kv_lora_rank and qk_rope_head_dim")
        return (m.kv_lora_rank + m.qk_rope_head_dim) * kv_element_bytes(m)
    heads = max(1, m.kv_heads_resolved // tp)
    return 2 * heads * m.head_dim_resolved * kv_element_bytes(m)


def kv_element_bytes(m: ModelConfig) -> int:
    """Bytes of one KV cache element: ``kv_cache_dtype``, else the model's ``dtype``."""
    return BYTES_PER_ELEMENT[m.kv_cache_dtype] if m.kv_cache_dtype else m.bytes_per_param


def devices_per_host(c: ClusterConfig) -> int:
    """Accelerators of the cluster sharing one host's DRAM and NVMe."""
    per = c.accelerators_per_node if isinstance(c, NodesCluster) else c.chips_per_host
    return max(1, min(per, c.devices))


def cache_slots(cfg: ExpertOffloadConfig, expert_bytes: int) -> int:
    """Experts an HBM expert cache holds: ``cache_experts``, or ``cache_gib`` in whole
    experts of ``expert_bytes``."""
    if cfg.cache_experts is not None:
        return cfg.cache_experts
    assert cfg.cache_gib is not None
    return int(cfg.cache_gib * GIB // max(1, expert_bytes))


def serving_memory(
    m: ModelConfig,
    p: ParallelismConfig,
    acc: AcceleratorSpec,
    offload: ExpertOffloadConfig | None = None,
    redundant: int = 0,
) -> ServingMemory:
    """Weights and KV bytes per device of ``m`` laid out as ``p`` on ``acc`` (with an
    HBM expert cache in place of all experts when ``offload`` is given; with
    ``redundant`` replicas each EP rank holds ``(experts + redundant) / ep`` expert slots
    in every MoE block)."""
    f = figures(m)
    slots = m.experts + redundant
    experts_per_rank = slots // p.ep if slots % p.ep == 0 else math.ceil(slots / p.ep)
    moe_blocks = math.ceil(f.moe_layers / p.pp)
    shard_params = math.ceil(f.expert_params / p.etp)
    device_experts = moe_blocks * experts_per_rank
    resident = device_experts
    cached: int | None = None
    staging = 0
    if offload is not None:
        cached = cache_slots(offload, shard_params * m.bytes_per_param)
        staging = experts_per_rank * (2 if offload.prefetch is not None else 1)
        resident = min(device_experts, cached + staging)
    expert_params = resident * shard_params
    other_params = math.ceil((f.total_params - f.routed_expert_params_total) / (p.tp * p.pp))
    memory_gib = acc.usable_memory_gib or acc.memory_gib
    blocks = math.ceil(m.layers / p.pp)
    return ServingMemory(
        device_bytes=int(memory_gib * GIB),
        expert_weight_bytes=expert_params * m.bytes_per_param,
        other_weight_bytes=other_params * m.bytes_per_param,
        kv_bytes_per_token=blocks * kv_bytes_per_token_per_layer(m, p.tp),
        expert_bytes=shard_params * m.bytes_per_param,
        device_experts=device_experts,
        cache_experts=cached,
        staging_experts=staging,
    )
