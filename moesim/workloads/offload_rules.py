"""Offloading rules of the workload kinds that model it: the HBM expert cache per device,
serving's DRAM/NVMe tiers, training's expert streaming and ZeRO-Offload."""

from __future__ import annotations

from moesim.config.scenario import Scenario
from moesim.config.training import TrainingWorkload
from moesim.derived.serving_memory import devices_per_host, serving_memory
from moesim.derived.training_memory import training_memory
from moesim.units import GIB
from moesim.workloads.base import Rule


def cache_size(s: Scenario) -> Rule:
    """The HBM expert cache is per device and holds between one expert and all the
    device's experts (``blocks x experts / ep``: that many keeps every one resident);
    a larger one is rejected, not clamped (it usually means a cache sized for the whole
    model rather than one device)."""

    e, m, p, acc = s.policies.offload.experts, s.model, s.parallelism, s.cluster.accelerator
    if e is None or m.experts % p.ep:
        return
    mem = serving_memory(m, p, acc, e)
    at = "policies.offload.experts"
    field = f"{at}.cache_experts" if e.cache_experts is not None else f"{at}.cache_gib"
    cached, most = mem.cache_experts, mem.device_experts
    expert_gib = mem.expert_bytes / GIB
    if cached is not None and cached < 1:
        yield (
            field,
            f"holds no whole expert (an expert is {expert_gib:.3f} GiB on each "
            f"{acc.name}), got {e.cache_gib} GiB",
        )
    if cached is None or cached <= most:
        return
    per = m.experts // p.ep
    blocks = most // per
    holds = (
        f"the {most} experts each {acc.name} holds ({blocks} MoE blocks"
        f"{' of its pipeline stage' if p.pp > 1 else ''} x {per}: {m.experts} experts / "
        f"ep {p.ep}{f', each its 1/{p.etp} etp shard' if p.etp > 1 else ''})"
    )
    if e.cache_experts is not None:
        yield (
            field,
            f"{cached} experts is more than {holds}; the cache is per device: at most "
            f"{most} (which keeps every expert resident)",
        )
    else:
        yield (
            field,
            f"{e.cache_gib} GiB holds {cached} experts of {expert_gib:.3f} GiB, more than "
            f"{holds}; the cache is per device: at most {most * expert_gib:.2f} GiB (which "
            "keeps every expert resident)",
        )


def offload_training(s: Scenario, w: TrainingWorkload) -> Rule:
    """Training streams every uncached expert each pass from host DRAM, and updates the
    streamed experts there: it needs ZeRO-Offload, and no NVMe tier or prefetch."""

    e, m, p = s.policies.offload.experts, s.model, s.parallelism
    assert e is not None
    at = "policies.offload.experts"
    if not s.policies.offload.optimizer:
        yield (
            "policies.offload.optimizer",
            "expert offloading in training keeps the streamed experts' optimizer states and "
            "their update on the host: set optimizer: true (ZeRO-Offload)",
        )
    if e.prefetch is not None:
        yield f"{at}.prefetch", "training uses every expert each pass: nothing to predict"
    if e.dram_gib is not None:
        yield f"{at}.dram_gib", "the NVMe tier is modelled for serving; training streams from DRAM"
    if m.experts % p.ep:
        return
    mem = serving_memory(m, p, s.cluster.accelerator, e)
    need = devices_per_host(s.cluster) * mem.offloaded_expert_bytes
    if need > s.cluster.host.dram_gib * GIB:
        yield (
            at,
            f"host DRAM is too small for the streamed experts: {need / GIB:.1f} GiB per host "
            f"> {s.cluster.host.dram_gib} GiB",
        )


def optimizer_offload(s: Scenario, w: TrainingWorkload) -> Rule:
    """ZeRO-Offload keeps the optimizer states of a host's devices in its DRAM."""
    m, p, acc, host = s.model, s.parallelism, s.cluster.accelerator, s.cluster.host
    if s.policies.offload.optimizer and m.experts % p.ep == 0:
        states = training_memory(m, p, acc, w).optimizer * devices_per_host(s.cluster)
        if states > host.dram_gib * GIB:
            yield (
                "policies.offload.optimizer",
                f"the optimizer states of a host's devices ({states / GIB:.1f} GiB) do not fit "
                f"its {host.dram_gib} GiB of DRAM",
            )


def training_offload(s: Scenario, w: TrainingWorkload) -> Rule:
    """Optimizer offloading, and expert offloading as training streams experts."""
    yield from optimizer_offload(s, w)
    if s.policies.offload.experts is not None:
        yield from cache_size(s)
        yield from offload_training(s, w)


def not_offloaded(s: Scenario, kind: str, experts: bool = True) -> Rule:
    """A workload kind that models no optimizer offloading (and, with ``experts``, no
    expert offloading) rejects them."""
    off = s.policies.offload
    if off.optimizer:
        yield "policies.offload.optimizer", f"optimizer offloading applies to training, not {kind}"
    if experts and off.experts is not None:
        yield (
            "policies.offload.experts",
            f"expert offloading is modelled for serving and training, not {kind}",
        )


def serving_offload(s: Scenario) -> Rule:
    """Serving's expert offloading: prefetch needs overlap, and the host keeps the
    offloaded experts in DRAM, or in DRAM and NVMe with ``dram_gib``."""
    e, m, p = s.policies.offload.experts, s.model, s.parallelism
    acc, host = s.cluster.accelerator, s.cluster.host
    if e is None:
        return
    yield from cache_size(s)
    at = "policies.offload.experts"
    if e.prefetch is not None and not e.overlap:
        yield f"{at}.prefetch", "prefetching needs overlap: true (copies alongside compute)"
    if m.experts % p.ep or p.pp != 1:
        return
    mem = serving_memory(m, p, acc, e)
    # the host keeps the distinct experts of its devices (one EP group's worth at most)
    groups = min(devices_per_host(s.cluster), p.ep * p.etp)
    need = groups * mem.device_experts * mem.expert_bytes
    if e.dram_gib is None:
        if need > host.dram_gib * GIB:
            yield (
                at,
                f"host DRAM is too small for the offloaded experts: {need / GIB:.1f} GiB per "
                f"host > dram_gib {host.dram_gib} GiB; set dram_gib to keep the rest on NVMe",
            )
        return
    if e.dram_gib > host.dram_gib:
        yield f"{at}.dram_gib", f"exceeds the host's DRAM ({host.dram_gib} GiB), got {e.dram_gib}"
    nvme_short = host.nvme_read_gbps <= 0 or need > host.nvme_tib * 1024 * GIB
    if need > e.dram_gib * GIB and nvme_short:
        yield (
            f"{at}.dram_gib",
            f"the {need / GIB:.1f} GiB of experts per host that do not all fit "
            f"{e.dram_gib} GiB of DRAM need NVMe, but the host has {host.nvme_tib} TiB "
            f"at {host.nvme_read_gbps} GB/s",
        )
