"""Cross-field rules: checks that span sections, run once the sections validate on their own.

Each rule yields ``(field path, message)``; the loader attaches file:line:col. All rules run,
so a scenario with several problems reports them all at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from moesim import catalog
from moesim.config.cluster import NodesCluster, TorusCluster
from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.config.workload import LayerWorkload
from moesim.derived import replica_memory
from moesim.derived.model_figures import figures
from moesim.derived.serving_memory import devices_per_host, serving_memory
from moesim.derived.training_memory import training_memory
from moesim.units import GIB
from moesim.workloads import kind_of

Rule = Iterator[tuple[str, str]]


def check(s: Scenario) -> list[tuple[str, str]]:
    """All cross-field problems of a scenario (empty when it is consistent)."""
    return [
        *_layout(s),
        *_policies(s),
        *_catalog_refs(s),
        *_hardware(s),
        *kind_of(s).rules(s),
        *_offload(s),
        *_failures(s),
    ]


def _offload(s: Scenario) -> Rule:
    """Offloading needs a host link and room below HBM; expert offloading is modelled for
    serving and training, optimizer offloading (ZeRO-Offload) for training."""

    off, w, m, p = s.policies.offload, s.workload, s.model, s.parallelism
    acc, host = s.cluster.accelerator, s.cluster.host
    where = "policies.offload"
    if (off.experts is not None or off.optimizer) and acc.host_link is None:
        yield "cluster.accelerator.host_link", f"offloading needs {acc.name}'s host link, got none"
    if off.optimizer and not isinstance(w, TrainingWorkload):
        yield f"{where}.optimizer", f"optimizer offloading applies to training, not {w.kind}"
    if off.optimizer and isinstance(w, TrainingWorkload) and m.experts % p.ep == 0:
        states = training_memory(m, p, acc, w).optimizer * devices_per_host(s.cluster)
        if states > host.dram_gib * GIB:
            yield (
                f"{where}.optimizer",
                f"the optimizer states of a host's devices ({states / GIB:.1f} GiB) do not fit "
                f"its {host.dram_gib} GiB of DRAM",
            )
    e = off.experts
    if e is None:
        return
    at = f"{where}.experts"
    if isinstance(w, (ServingWorkload, TrainingWorkload)):
        yield from _cache_size(s)
    if isinstance(w, TrainingWorkload):
        yield from _offload_training(s, w)
        return
    if not isinstance(w, ServingWorkload):
        yield at, f"expert offloading is modelled for serving and training, not {w.kind}"
        return
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


def _cache_size(s: Scenario) -> Rule:
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


def _offload_training(s: Scenario, w: TrainingWorkload) -> Rule:
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


def _hardware(s: Scenario) -> Rule:
    acc = s.cluster.accelerator
    if getattr(acc.peak_tflops, s.model.dtype) is None:
        yield (
            "model.dtype",
            f"{s.cluster.accelerator.name} has no {s.model.dtype} peak in the catalog; "
            "pick a dtype it supports",
        )


def _layout(s: Scenario) -> Rule:
    p, m = s.parallelism, s.model
    devices = s.cluster.devices
    if p.devices != devices:
        yield (
            "parallelism",
            f"dp x tp x pp = {p.dp} x {p.tp} x {p.pp} = {p.devices} must equal the cluster's "
            f"devices ({devices})",
        )
    if m.experts % p.ep:
        yield "parallelism.ep", f"must divide model.experts ({m.experts}), got {p.ep}"
    if (p.dp * p.tp) % (p.ep * p.etp):
        yield (
            "parallelism.ep",
            f"ep x etp = {p.ep * p.etp} must divide dp x tp = {p.dp * p.tp} "
            "(expert-parallel groups are carved out of each stage's dp x tp ranks)",
        )
    if m.expert_d_ff % p.etp:
        yield "parallelism.etp", f"must divide model.expert_d_ff ({m.expert_d_ff}), got {p.etp}"
    if isinstance(p.placement, list):
        if len(p.placement) != m.experts:
            yield (
                "parallelism.placement",
                f"an explicit placement needs one EP rank per expert ({m.experts}), "
                f"got {len(p.placement)}",
            )
        bad = [r for r in p.placement if not 0 <= r < p.ep]
        if bad:
            yield "parallelism.placement", f"EP ranks must be in [0, ep={p.ep}), got {bad[0]}"
        else:
            per_rank = m.experts // p.ep if m.experts % p.ep == 0 else None
            counts = [p.placement.count(r) for r in range(p.ep)]
            if per_rank is not None and any(c != per_rank for c in counts):
                yield (
                    "parallelism.placement",
                    f"every EP rank must hold experts/ep = {per_rank} experts, got {counts}",
                )


def _policies(s: Scenario) -> Rule:
    pol = s.policies
    if pol.overflow == "dropless" and pol.capacity_factor is not None:
        yield (
            "policies.capacity_factor",
            f"must be null when policies.overflow is 'dropless', got {pol.capacity_factor}",
        )


def _catalog_refs(s: Scenario) -> Rule:
    """Every link and switch the cluster names is a catalog preset or a spec the scenario
    defines under that name (``cluster.links`` / ``cluster.switches``)."""
    c = s.cluster
    links = set(catalog.names("links")) | set(c.links)
    switches = set(catalog.names("switches")) | set(c.switches)
    for i, port in enumerate(c.accelerator.ports):
        if port.link not in links:
            yield f"cluster.accelerator.ports[{i}].link", _unknown("link", port.link, links)
    if c.accelerator.host_link is not None and c.accelerator.host_link not in links:
        yield "cluster.accelerator.host_link", _unknown("link", c.accelerator.host_link, links)
    if isinstance(c, TorusCluster):
        if c.link not in links:
            yield "cluster.link", _unknown("link", c.link, links)
        return
    yield from _nodes_refs(c, links, switches)


def _nodes_refs(c: NodesCluster, links: set[str], switches: set[str]) -> Rule:
    su = c.scale_up
    if su.kind in ("nvswitch", "pcie"):
        if su.switch is None:
            yield "cluster.scale_up.switch", f"required when scale_up.kind is {su.kind!r}"
        elif su.switch not in switches:
            yield "cluster.scale_up.switch", _unknown("switch", su.switch, switches)
    if su.kind in ("nvswitch", "mesh") and not c.accelerator.ports and c.accelerators_per_node > 1:
        yield "cluster.scale_up.kind", f"{su.kind!r} needs accelerator ports (scale-up links)"
    if su.kind == "pcie" and c.accelerator.host_link is None:
        yield "cluster.scale_up.kind", "'pcie' needs cluster.accelerator.host_link"
    fab = c.fabric
    if c.nodes > 1 and fab.kind == "none":
        yield "cluster.fabric.kind", f"a cluster of {c.nodes} nodes needs a fabric, got 'none'"
    if fab.kind != "none":
        if fab.nic is None:
            yield "cluster.fabric.nic", "required when the fabric is not 'none'"
        elif fab.nic not in links:
            yield "cluster.fabric.nic", _unknown("link", fab.nic, links)
        if fab.nics_per_node < 1:
            yield "cluster.fabric.nics_per_node", "must be >= 1 when the fabric is not 'none'"
        elif fab.nics_per_node > c.accelerators_per_node:
            yield (
                "cluster.fabric.nics_per_node",
                f"must be <= accelerators_per_node ({c.accelerators_per_node}), "
                f"got {fab.nics_per_node}",
            )
        if fab.switch is None:
            yield "cluster.fabric.switch", "required when the fabric is not 'none'"
        elif fab.switch not in switches:
            yield "cluster.fabric.switch", _unknown("switch", fab.switch, switches)
        if fab.kind == "rail_optimized" and fab.nics_per_node != c.accelerators_per_node:
            yield (
                "cluster.fabric.nics_per_node",
                f"a rail-optimized fabric needs one NIC per accelerator "
                f"({c.accelerators_per_node}), got {fab.nics_per_node}",
            )


def _unknown(what: str, name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} preset {name!r}{hint}"


def _failures(s: Scenario) -> Rule:
    """Failures name real devices and experts, fit the workload, and replicas fit memory."""
    f = s.failures
    if f is None:
        return
    import math

    w, m, p = s.workload, s.model, s.parallelism
    n = s.cluster.devices
    if isinstance(w, LayerWorkload):
        yield "failures", "failures apply to serving and training workloads, not 'layer'"
        return

    def device(path: str, d: int) -> Rule:
        if d >= n:
            yield path, f"device {d} does not exist: the cluster has devices 0..{n - 1}"

    for i, proc in enumerate(f.devices):
        if proc.kind == "scheduled":
            yield from device(f"failures.devices[{i}].device", proc.device)
        elif proc.devices is not None:
            for j, d in enumerate(proc.devices):
                yield from device(f"failures.devices[{i}].devices[{j}]", d)
    has_nic = isinstance(s.cluster, NodesCluster) and s.cluster.fabric.kind != "none"
    for i, link in enumerate(f.links):
        yield from device(f"failures.links[{i}].device", link.device)
        if link.link == "nic" and not has_nic:
            yield f"failures.links[{i}].link", "'nic' needs a cluster with a fabric (NICs)"
    for i, st in enumerate(f.stragglers):
        yield from device(f"failures.stragglers[{i}].device", st.device)
    rec = f.recovery
    # events must start within the run: later ones would never be simulated (serving
    # drains after duration_s, but failures are part of the measured run)
    end = getattr(w, "duration_s", None)
    if end is not None:
        starts = [
            (f"failures.devices[{i}].at_s", proc.at_s, "scheduled failure")
            for i, proc in enumerate(f.devices)
            if proc.kind == "scheduled"
        ]
        starts += [
            (f"failures.links[{i}].at_s", x.at_s, "link event") for i, x in enumerate(f.links)
        ]
        starts += [
            (f"failures.stragglers[{i}].from_s", x.from_s, "straggler")
            for i, x in enumerate(f.stragglers)
        ]
        for path, t, what in starts:
            if t >= end:
                yield (
                    path,
                    f"the {what} at {t:g} s starts at or after the end of the run "
                    f"(workload.duration_s = {end:g} s): it would never happen; schedule it "
                    "earlier or lengthen the run",
                )
    # a second scheduled failure of a device certainly still down then (whether a device
    # is back depends on spares and random failures otherwise: the run lists it ignored)
    down_for_good = rec.repair_s is None and rec.hot_spares == 0
    sched = sorted(
        (proc.at_s, i, proc.device) for i, proc in enumerate(f.devices) if proc.kind == "scheduled"
    )
    first: dict[int, tuple[float, int]] = {}
    for t, i, d in sched:
        if d not in first:
            first[d] = (t, i)
            continue
        t0, i0 = first[d]
        if t == t0 or down_for_good:
            why = "at the same time" if t == t0 else "and no repair_s or hot spare brings it back"
            yield (
                f"failures.devices[{i}].at_s",
                f"device {d} is already down at {t:g} s: failures.devices[{i0}] fails it at "
                f"{t0:g} s {why}",
            )
    reps = rec.replicas
    n_reps = len(reps) if isinstance(reps, list) else reps
    if isinstance(reps, list):
        for j, e in enumerate(reps):
            if e >= m.experts:
                yield (
                    f"failures.recovery.replicas[{j}]",
                    f"expert {e} does not exist: the model has experts 0..{m.experts - 1}",
                )
    elif reps > m.experts:
        yield "failures.recovery.replicas", f"must be <= model.experts ({m.experts}), got {reps}"
    if isinstance(w, TrainingWorkload):
        if w.duration_s is None:
            yield (
                "workload.duration_s",
                "required with a failures section: the length of the training run, seconds",
            )
        if n_reps:
            yield (
                "failures.recovery.replicas",
                "a training job restarts from its checkpoint after any failure; expert "
                "replicas apply to serving",
            )
        ck = f.checkpoint
        if ck is not None and ck.write_gbps is None and s.cluster.host.nvme_write_gbps <= 0:
            yield (
                "failures.checkpoint.write_gbps",
                "required: the cluster's hosts have no NVMe to write checkpoints to "
                "(host.nvme_write_gbps is 0)",
            )
        return
    # serving
    if f.checkpoint is not None:
        yield "failures.checkpoint", "checkpoint-restart applies to training workloads"
    if rec.on_expert_loss == "replica" and not n_reps:
        yield (
            "failures.recovery.replicas",
            "on_expert_loss 'replica' needs replicas: a count of the most popular experts "
            "or a list of expert ids",
        )
    if not n_reps:
        return
    if p.ep < 2:
        yield (
            "failures.recovery.replicas",
            f"a replica lives on the next EP rank: needs parallelism.ep >= 2, got {p.ep}",
        )
        return
    if m.experts % p.ep or p.pp != 1 or not isinstance(w, ServingWorkload):
        return
    replica_bytes = replica_memory.replica_bytes(s)
    per_rank = replica_bytes // max(1, _expert_stack_bytes(s))
    mem = serving_memory(m, p, s.cluster.accelerator, s.policies.offload.experts)
    acc = s.cluster.accelerator
    if mem.weight_bytes >= mem.device_bytes:
        return  # reported by the serving rule
    left = mem.device_bytes - mem.weight_bytes - replica_bytes
    kv_tokens = math.floor(w.kv_cache_fraction * max(0, left)) // max(1, mem.kv_bytes_per_token)
    if left <= 0 or kv_tokens < w.scheduler.block_tokens:
        yield (
            "failures.recovery.replicas",
            f"the replicas do not fit: {per_rank} replica expert(s) per device take "
            f"{replica_bytes / GIB:.1f} GiB on top of {mem.weight_bytes / GIB:.1f} GiB of "
            f"weights, and each {acc.name} has {mem.device_bytes / GIB:.1f} GiB (no room "
            "left for a KV block); replicate fewer experts or raise ep",
        )


def _expert_stack_bytes(s: Scenario) -> int:
    """One expert's weights over the MoE blocks of a stage, on one device."""
    import math

    f, p = figures(s.model), s.parallelism
    blocks = math.ceil(f.moe_layers / p.pp)
    return blocks * math.ceil(f.expert_params / p.etp) * s.model.bytes_per_param
