"""Cross-field rules: checks that span sections, run once the sections validate on their own.

Each rule yields ``(field path, message)``; the loader attaches file:line:col. All rules run,
so a scenario with several problems reports them all at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from moesim.config.cluster import NodesCluster
from moesim.config.scenario import Scenario
from moesim.workloads import kind_of
from moesim.workloads.replica_rules import replica_rules

Rule = Iterator[tuple[str, str]]


def check(s: Scenario) -> list[tuple[str, str]]:
    """All cross-field problems of a scenario (empty when it is consistent)."""
    return [
        *_layout(s),
        *_policies(s),
        *_wiring(s),
        *_hardware(s),
        *_offload(s),
        *_failures(s),
        *_routing(s),
        *replica_rules(s),
        *kind_of(s).rules(s),
    ]


def _routing(s: Scenario) -> Rule:
    """A routing trace matches the model (every token checked, located by line or token);
    a popularity vector or logits bias has one value per expert."""
    from moesim.config.routing import LogitsRouting, PopularityRouting, TraceRouting
    from moesim.routing.trace import TraceError, model_problems, trace_info

    r, m = s.routing, s.model
    layers = len(m.moe_layer_indices)
    if isinstance(r, TraceRouting):
        try:
            info = trace_info(r.path, m.experts)
        except TraceError as exc:
            yield "routing.path", str(exc)
            return
        for problem in model_problems(info, m.experts, m.top_k, layers):
            yield "routing.path", f"trace {r.path!r}: {problem}"
    elif isinstance(r, PopularityRouting) and len(r.weights) != m.experts:
        yield (
            "routing.weights",
            f"needs one weight per expert (model.experts = {m.experts}), got {len(r.weights)}",
        )
    elif isinstance(r, LogitsRouting):
        if len(r.bias[0]) != m.experts:
            yield (
                "routing.bias",
                f"needs one value per expert (model.experts = {m.experts}) in each row, "
                f"got {len(r.bias[0])}",
            )
        if len(r.bias) not in (1, layers):
            yield (
                "routing.bias",
                f"one row for every MoE layer or one per MoE layer ({layers}), got {len(r.bias)}",
            )
    if isinstance(r, TraceRouting | LogitsRouting) and s.failures is not None:
        yield "routing.kind", f"failures are not modelled with {r.kind!r} routing yet"


def _offload(s: Scenario) -> Rule:
    """Offloading needs a host link (which workloads model which offloading is each
    workload kind's rule)."""
    off, acc = s.policies.offload, s.cluster.accelerator
    if (off.experts is not None or off.optimizer) and acc.host_link is None:
        yield "cluster.accelerator.host_link", f"offloading needs {acc.name}'s host link, got none"


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
    pooled = getattr(s.workload, "pools", None) is not None  # each pool has its layout
    if p.devices != devices and not pooled:
        yield (
            "parallelism",
            f"dp x tp x pp = {p.dp} x {p.tp} x {p.pp} = {p.devices} must equal the cluster's "
            f"devices ({devices})",
        )
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


def _wiring(s: Scenario) -> Rule:
    """A node cluster's scale-up and fabric are complete and consistent. (Every link and
    switch it names has a spec: the loader resolves them and the cluster type checks it.)"""
    if isinstance(s.cluster, NodesCluster):
        yield from _nodes_wiring(s.cluster)


def _nodes_wiring(c: NodesCluster) -> Rule:
    su = c.scale_up
    if su.kind in ("nvswitch", "pcie") and su.switch is None:
        yield "cluster.scale_up.switch", f"required when scale_up.kind is {su.kind!r}"
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
        if fab.kind == "rail_optimized" and fab.nics_per_node != c.accelerators_per_node:
            yield (
                "cluster.fabric.nics_per_node",
                f"a rail-optimized fabric needs one NIC per accelerator "
                f"({c.accelerators_per_node}), got {fab.nics_per_node}",
            )


def _failures(s: Scenario) -> Rule:
    """Failures name real devices and experts and happen within the run (what each workload
    kind does with them is its own rule)."""
    f = s.failures
    if f is None:
        return

    w, m = s.workload, s.model
    n = s.cluster.devices

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
    if isinstance(reps, list):
        for j, e in enumerate(reps):
            if e >= m.experts:
                yield (
                    f"failures.recovery.replicas[{j}]",
                    f"expert {e} does not exist: the model has experts 0..{m.experts - 1}",
                )
    elif reps > m.experts:
        yield "failures.recovery.replicas", f"must be <= model.experts ({m.experts}), got {reps}"
