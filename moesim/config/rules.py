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

Rule = Iterator[tuple[str, str]]


def check(s: Scenario) -> list[tuple[str, str]]:
    """All cross-field problems of a scenario (empty when it is consistent)."""
    return [*_layout(s), *_policies(s), *_catalog_refs(s), *_hardware(s), *_serving(s)]


def _serving(s: Scenario) -> Rule:
    """A served model must be decoder-only, on one pipeline stage, shardable over tp, and
    its weights must fit each device with room for KV blocks."""
    from moesim.derived.serving_memory import GIB, serving_memory

    w, m, p = s.workload, s.model, s.parallelism
    if not isinstance(w, ServingWorkload):
        return
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
    if m.experts % p.ep or p.pp != 1:
        return
    mem = serving_memory(m, p, s.cluster.accelerator)
    acc = s.cluster.accelerator
    if mem.weight_bytes >= mem.device_bytes:
        yield (
            "parallelism",
            f"the weights do not fit: each {acc.name} needs {mem.weight_bytes / GIB:.1f} GiB "
            f"({mem.expert_weight_bytes / GIB:.1f} GiB of experts over ep={p.ep}"
            f"{f' x etp={p.etp}' if p.etp > 1 else ''}, {mem.other_weight_bytes / GIB:.1f} "
            f"GiB of the rest over tp={p.tp}) but has {mem.device_bytes / GIB:.1f} GiB; "
            "raise ep or tp, or use a larger device",
        )
    elif mem.kv_blocks(w.kv_cache_fraction, w.scheduler.block_tokens) < 1:
        yield (
            "workload.kv_cache_fraction",
            f"leaves no KV block: {mem.kv_bytes(w.kv_cache_fraction) / GIB:.3f} GiB per "
            f"{acc.name} for {mem.kv_bytes_per_token} bytes per token x "
            f"{w.scheduler.block_tokens} tokens per block",
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
    c = s.cluster
    links, switches = set(catalog.names("links")), set(catalog.names("switches"))
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
