"""Offloading in training: experts streamed in for every micro-batch pass, and ZeRO-Offload's
host-side optimizer step (Ren et al., USENIX ATC 2021)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moesim.config.scenario import Scenario
from moesim.config.training import TrainingWorkload
from moesim.derived.serving_memory import (
    devices_per_host,
    serving_memory,
)
from moesim.system import System

if TYPE_CHECKING:
    from moesim.cost.training import StageCost

from moesim.cost.offload.tiers import tier_rates
from moesim.units import GB


@dataclass(frozen=True)
class ExpertStream:
    """Experts a training stage streams per micro-batch pass, and the copy time, seconds."""

    streamed_experts: int
    """Experts of the stage's device outside its cache (a training micro-batch of
    thousands of tokens uses every expert, so every one of them is copied in each pass)."""
    copy_s: float
    """Copying them in once (forward; in backward the same, with their bf16 gradients going
    out over the other direction of the full-duplex link at the same time)."""


def expert_stream(s: Scenario) -> ExpertStream | None:
    """The per-pass expert streaming of a training scenario, None without expert offload."""
    cfg = s.policies.offload.experts
    if cfg is None:
        return None
    mem = serving_memory(s.model, s.parallelism, s.cluster.accelerator, cfg)
    n = mem.device_experts - min(mem.device_experts, mem.cache_experts or 0)
    r = tier_rates(s, cfg.host_memory)
    return ExpertStream(n, n * (r.latency_s + mem.expert_bytes / r.dram_bps))


def offload_stages(system: System, stages: list[StageCost]) -> list[StageCost]:
    """Training stage costs with expert streaming: each forward and backward pass of a
    micro-batch copies the stage's uncached experts in (:func:`expert_stream`); with
    ``overlap`` the copies run under the pass's compute and only the excess adds, else
    they add in full."""
    s = system.scenario
    stream = expert_stream(s)
    cfg = s.policies.offload.experts
    if stream is None or cfg is None:
        return stages
    c = stream.copy_s

    def with_copies(pass_s: float) -> float:
        # max() rather than pass + (c - pass): a copy-bound pass takes exactly the copies
        return max(pass_s, c) if cfg.overlap else pass_s + c

    return [
        replace(st, fwd_s=with_copies(st.fwd_s), bwd_s=with_copies(st.bwd_s)) for st in stages
    ]


@dataclass(frozen=True)
class OptimizerOffload:
    """One training step's optimizer work on the host (ZeRO-Offload), seconds."""

    grad_d2h_s: float
    """bf16 gradients of the device's optimizer shard, device to host over the host link."""
    cpu_step_s: float
    """The CPU Adam step over the host's shards at host DRAM bandwidth."""
    param_h2d_s: float
    """Updated bf16 weights of the shard, host to device."""
    host_bytes: float
    """Host DRAM holding the optimizer states of one host's devices."""

    @property
    def total_s(self) -> float:
        """Costed one after another (conservative: ZeRO-Offload overlaps the gradient
        copy with the backward pass, which this does not model)."""
        return self.grad_d2h_s + self.cpu_step_s + self.param_h2d_s


def optimizer_offload(s: Scenario, w: TrainingWorkload, shard_params: float) -> OptimizerOffload:
    """ZeRO-Offload costs of one step for a device whose optimizer shard has
    ``shard_params`` parameters (Ren et al., "ZeRO-Offload", USENIX ATC 2021): gradients
    out (2 bytes per parameter; 4 under ``amp_fp32_master``), a CPU Adam step reading
    the fp32 states and the gradient and writing the states and the weights
    (``2 x optimizer_bytes_per_param + 2 + 2`` bytes per parameter in bf16, over the
    host's devices, at ``host.dram_bandwidth_gbps``), and
    the weights back in (2 bytes per parameter); transfers at the host link's rate."""
    rates = tier_rates(s)
    share = devices_per_host(s.cluster)
    grad_bytes = w.grad_bytes * shard_params
    cpu_bytes = share * shard_params * (2 * w.state_bytes + w.grad_bytes + w.weight_bytes)
    return OptimizerOffload(
        grad_d2h_s=rates.latency_s + grad_bytes / rates.dram_bps,
        cpu_step_s=cpu_bytes / (s.cluster.host.dram_bandwidth_gbps * GB),
        param_h2d_s=rates.latency_s + grad_bytes / rates.dram_bps,
        host_bytes=share * shard_params * w.state_bytes,
    )
