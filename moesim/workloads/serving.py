"""The ``serving`` workload kind: online serving with continuous batching over a window of
arrivals, with expert offloading and failures where the scenario has them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.derived.expert_replicas import balance_summary
from moesim.derived.serving_memory import serving_memory
from moesim.units import GIB
from moesim.workloads.base import AddPlot, Rule, Simulated
from moesim.workloads.failure_rules import serving_failures
from moesim.workloads.offload_rules import not_offloaded, serving_offload
from moesim.workloads.pools import pool_rules, pools_of, simulate_pooled

if TYPE_CHECKING:
    from moesim.cost.layer_cost import MoELayerCost
    from moesim.system import System


def serving_shape(s: Scenario, w: ServingWorkload) -> Rule:
    """A served model must be decoder-only, on one pipeline stage, shardable over tp,
    and its weights must fit each device with room for KV blocks."""
    m, p = s.model, s.parallelism
    if m.architecture != "decoder":
        yield "model.architecture", "serving simulates decoder-only models, got encoder_decoder"
    if p.pp != 1:
        yield "parallelism.pp", f"serving with pipeline parallelism is not modelled, got {p.pp}"
    if m.heads % p.tp:
        yield (
            "parallelism.tp",
            f"must divide model.heads ({m.heads}) to split attention, got {p.tp}",
        )
    kv = m.kv_heads_resolved
    if m.attention != "mla" and kv % p.tp and p.tp % kv:
        yield (
            "parallelism.tp",
            f"must divide model kv_heads ({kv}) or be a multiple of it, got {p.tp}",
        )
    redundant = s.policies.experts.redundant
    if (m.experts + redundant) % p.ep or p.pp != 1:
        return
    off = s.policies.offload.experts
    mem = serving_memory(m, p, s.cluster.accelerator, off, redundant)
    acc = s.cluster.accelerator
    if off is not None and (mem.cache_experts or 0) > mem.device_experts:
        return  # the offload rule says the cache is larger than the device's experts
    if off is not None and mem.weight_bytes >= mem.device_bytes:
        field = "cache_experts" if off.cache_experts is not None else "cache_gib"
        yield (
            f"policies.offload.experts.{field}",
            f"the expert cache does not fit in HBM: {mem.cache_experts} experts (+ "
            f"{mem.staging_experts} staging) x {mem.expert_bytes / GIB:.3f} GiB = "
            f"{mem.expert_weight_bytes / GIB:.1f} GiB plus "
            f"{mem.other_weight_bytes / GIB:.1f} GiB of other weights exceed the "
            f"{mem.device_bytes / GIB:.1f} GiB of each {acc.name}; use a smaller cache",
        )
    elif mem.weight_bytes >= mem.device_bytes:
        yield (
            "parallelism",
            f"the weights do not fit: each {acc.name} needs "
            f"{mem.weight_bytes / GIB:.1f} GiB ({mem.expert_weight_bytes / GIB:.1f} GiB "
            f"of {f'{m.experts + redundant} expert slots' if redundant else 'experts'} "
            f"over ep={p.ep}"
            f"{f' x etp={p.etp}' if p.etp > 1 else ''}, "
            f"{mem.other_weight_bytes / GIB:.1f} GiB of the rest over tp={p.tp}) but "
            f"has {mem.device_bytes / GIB:.1f} GiB; raise ep or tp, or use a larger device",
        )
    elif mem.kv_blocks(w.kv_cache_fraction, w.scheduler.block_tokens) < 1:
        yield (
            "workload.kv_cache_fraction",
            f"leaves no KV block: {mem.kv_bytes(w.kv_cache_fraction) / GIB:.3f} GiB per "
            f"{acc.name} for {mem.kv_bytes_per_token} bytes per token x "
            f"{w.scheduler.block_tokens} tokens per block",
        )


class ServingKind:
    """vLLM-style DP attention + EP experts serving (see moesim.engine.serving)."""

    name = "serving"

    def rules(self, scenario: Scenario) -> Rule:
        """Shape and memory (:func:`serving_shape`), expert offloading, failures."""
        w = scenario.workload
        assert isinstance(w, ServingWorkload)
        if w.pools is not None:  # each pool is checked as a co-located instance
            yield from pool_rules(scenario, w.pools)
            return
        yield from serving_shape(scenario, w)
        yield from not_offloaded(scenario, self.name, experts=False)
        yield from serving_offload(scenario)
        yield from serving_failures(scenario, w)

    def simulate(self, system: System, moe_cost: MoELayerCost | None) -> Simulated:
        from moesim.failures.serving import simulate_serving_with_failures

        if pools_of(system.scenario) is not None:
            from moesim.workloads.pool_summary import end_to_end

            pooled = simulate_pooled(system)
            return Simulated(end_to_end(pooled), run=pooled)
        rec = simulate_serving_with_failures(system, moe_cost)
        return Simulated(rec, routed=rec.routed)

    def shares_layer_cost(self) -> bool:
        return True

    def summary(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.report.failures import serving_failures_summary
        from moesim.report.serving import serving_summary

        summary = serving_summary(system, sim.records)
        w = system.scenario.workload
        assert isinstance(w, ServingWorkload)
        if w.pools is not None:
            from moesim.workloads.pool_summary import pools_summary

            return pools_summary(system, sim.run, summary)
        balance = balance_summary(system.scenario, w.duration_s)
        if balance is not None:
            summary["experts"] = balance
        if sim.routed is not None:
            summary["routing"] = sim.routed.summary()
        if sim.records.failures is not None:
            summary["failures"] = serving_failures_summary(system, sim.records)
        return summary

    def energy(self, system: System, sim: Simulated) -> dict[str, Any]:
        from moesim.energy.summary import serving_energy

        if sim.run is not None:
            from moesim.workloads.pool_summary import pools_energy

            return pools_energy(sim.run)
        return serving_energy(system, sim.records)

    def traces(self, system: System, sim: Simulated) -> dict[str, dict[str, Any]]:
        from moesim.engine.serving import ServingRecords
        from moesim.report.failures import serving_failure_trace

        rec: ServingRecords = sim.records
        if rec.failures is None:
            return {}
        it = rec.iterations
        devices = system.topology.devices
        trace = serving_failure_trace(rec.failures, it.start_s, it.duration_s, devices)
        return {"trace.json": trace}

    def table(self, summary: dict[str, Any]) -> str:
        from moesim.report.serving import serving_table

        return serving_table(summary)

    def plots(self, summary: dict[str, Any], sim: Simulated, add: AddPlot) -> None:
        from moesim.report.plots import serving_plots

        serving_plots(summary, sim.records, add)
