"""Candidates of a capacity plan and the closed-form checks that prune them.

``moesim plan`` answers "how many devices, of which accelerator, in which layout, serve
this model at R requests/s within this SLO, at what energy?". A candidate is one device
count, accelerator, serving layout (dp x tp data/tensor-parallel attention, ep expert
parallelism, etp expert tensor parallelism when searched; serving has one pipeline stage:
the engine does not model pipelined serving), engine and capacity factor (a factor drops
the overflow, ``null`` is dropless), written as
``--set`` overrides of the base serving scenario. Before anything is simulated, each
candidate passes, in order:

1. **the layout rules**: the loader's own serving rules (tp divides the heads, the KV
   heads split or replicate, ep divides the experts and ``dp x tp``);
2. **memory fit** in closed form (:func:`moesim.derived.serving_memory.serving_memory`):
   the weights leave room for at least one KV block on every device -- the loader's rule;
3. **keep-up bounds** that no real server beats, so a pruned candidate is certainly
   infeasible: the offered load's FLOPs (``rate x (prompt + output tokens) x 2 x active
   parameters``) within the devices' dense bf16 peak; the time of one decode step, at
   least the device's non-expert weights read once at its peak memory bandwidth (a small
   batch may touch few experts), within the TPOT target; and the KV cache holding the
   sequences the load keeps in flight by Little's law (``rate x output tokens x that
   step time`` sequences of at least their mean prompt plus half their output).

What survives is simulated (:mod:`moesim.sweep.plan_run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload


@dataclass(frozen=True)
class Candidate:
    """One configuration of the search, with the overrides that make it."""

    accelerator: str
    devices: int
    dp: int
    tp: int
    ep: int
    etp: int = 1
    """Expert tensor parallelism: each expert's weights split over ``etp`` devices."""
    engine: str | None = None
    capacity_factor: float | str | None = "base"
    """The candidate's ``policies.capacity_factor`` ("base": the scenario's own)."""
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``8x h100-sxm dp8 tp1 ep8`` (plus etp, engine and capacity factor when searched)."""
        layout = f"dp{self.dp} tp{self.tp} ep{self.ep}" + (
            f" etp{self.etp}" if self.etp > 1 else ""
        )
        parts = [f"{self.devices}x {self.accelerator}", layout]
        if self.engine is not None:
            parts.append(f"engine {self.engine}")
        if self.capacity_factor != "base":
            parts.append(f"cf {self.capacity_factor}")
        return " ".join(parts)

    def values(self) -> dict[str, Any]:
        """The searched fields, as a plan's point file and table record them."""
        v: dict[str, Any] = {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "dp": self.dp,
            "tp": self.tp,
            "ep": self.ep,
        }
        if self.etp > 1:
            v["etp"] = self.etp
        if self.engine is not None:
            v["engine"] = self.engine
        if self.capacity_factor != "base":
            v["capacity_factor"] = self.capacity_factor
        return v


@dataclass(frozen=True)
class Pruned:
    """A candidate rejected in closed form, and why."""

    candidate: Candidate
    reason: str


@dataclass
class Space:
    """The candidates that survive the closed-form checks, and the pruned ones."""

    survivors: list[Candidate] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)
    resolved: dict[Candidate, Scenario] = field(default_factory=dict)
    """Each survivor's scenario as the loader resolved it (validated once, here)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def cluster_overrides(base: Scenario, accelerator: str, devices: int) -> list[str]:
    """``--set`` texts giving the base cluster ``devices`` accelerators of one kind: fewer
    per node than the preset's on one node, else whole nodes, joined by a rail-optimized
    NDR InfiniBand fabric where the preset has none."""
    c = base.cluster
    per_node = getattr(c, "accelerators_per_node", None)
    if per_node is None:
        raise ValueError("plan searches clusters of GPU nodes (cluster.kind nodes)")
    same = accelerator == c.accelerator.name  # keep the scenario's own (and its overrides)
    out = [] if same else [f"cluster.accelerator={accelerator}"]
    if devices <= per_node:
        return [*out, "cluster.nodes=1", f"cluster.accelerators_per_node={devices}"]
    out += [f"cluster.accelerators_per_node={per_node}", f"cluster.nodes={devices // per_node}"]
    if getattr(getattr(c, "fabric", None), "kind", "none") == "none":
        out.append(
            "cluster.fabric={kind: rail_optimized, nic: ib-ndr, nics_per_node: "
            f"{per_node}, switch: ib-quantum2-ndr}}"
        )
    return out


def layouts(
    base: Scenario, devices: int, mode: str, etps: Sequence[int] = (1,)
) -> list[tuple[int, int, int, int]]:
    """``(dp, tp, ep, etp)`` layouts of ``devices`` GPUs for serving: tp a power of two
    within one node; for each expert tensor-parallel degree ``etp`` in ``etps``, ``auto``:
    the largest ep that divides the experts with ``ep x etp`` dividing the devices (expert
    parallelism over every GPU, as vLLM's ``--enable-expert-parallel``; with etp > 1 each
    expert's weights are split over etp GPUs instead of replicated); ``all``: every such
    ep."""
    c = base.cluster
    per_node = int(getattr(c, "accelerators_per_node", devices))
    experts = base.model.experts
    out = []
    for tp in _powers_of_two(min(per_node, devices)):
        if devices % tp:
            continue
        dp = devices // tp
        for etp in etps:
            eps = [e for e in _divisors(experts) if devices % (e * etp) == 0]
            if mode == "auto":
                eps = eps[-1:]
            out += [(dp, tp, ep, etp) for ep in eps]
    return out


def _mean_length(dist: Any) -> float | None:
    kind = getattr(dist, "kind", None)
    if kind == "constant":
        return float(dist.value)
    if kind == "uniform":
        return (dist.low + dist.high) / 2
    if kind == "lognormal":
        return float(dist.mean) if dist.max is None else min(float(dist.mean), float(dist.max))
    return None


def closed_form_reason(s: Scenario, rate: float, tpot_ms: float | None) -> str | None:
    """Why the resolved candidate ``s`` cannot be feasible at ``rate`` (None: it may be):
    the layout rules, memory fit and the keep-up bounds of the module."""
    from moesim.derived.model_figures import figures
    from moesim.derived.serving_memory import serving_memory
    from moesim.units import GIB
    from moesim.workloads.serving import serving_shape

    w = s.workload
    assert isinstance(w, ServingWorkload)
    for where, message in serving_shape(s, w):
        return f"{where}: {message}"
    p, m, acc = s.parallelism, s.model, s.cluster.accelerator
    if (p.ep * p.etp) and (p.dp * p.tp) % (p.ep * p.etp):
        return f"ep x etp ({p.ep * p.etp}) must divide dp x tp ({p.dp * p.tp})"
    mem = serving_memory(m, p, acc, s.policies.offload.experts)
    n = s.cluster.devices
    # every decode step reads at least the device's non-expert weights (a small batch may
    # touch few of its experts, so they are left out of the bound)
    step_s = mem.other_weight_bytes / (acc.memory_bandwidth_gbps * 1e9)
    if tpot_ms is not None and step_s * 1e3 > tpot_ms:
        return (
            f"a decode step reads {mem.other_weight_bytes / GIB:.1f} GiB of non-expert "
            f"weights per device: at least {step_s * 1e3:.1f} ms > TPOT {tpot_ms:g} ms"
        )
    prompt, output = _mean_length(w.prompt_tokens), _mean_length(w.output_tokens)
    if prompt is None or output is None:
        return None
    f = figures(m)
    need = rate * (prompt + output) * 2 * f.active_params
    peak = n * acc.peak_tflops.bf16 * 1e12
    if need > peak:
        return (
            f"compute: the load needs {need / 1e15:.2f} PFLOP/s, over the devices' "
            f"{peak / 1e15:.2f} PFLOP/s bf16 peak"
        )
    in_flight = rate * output * step_s
    kv_need = in_flight * (prompt + output / 2) * mem.kv_bytes_per_token * p.tp
    kv_have = mem.kv_bytes(w.kv_cache_fraction) * n
    if kv_need > kv_have:
        return (
            f"KV cache: {in_flight:.0f} sequences in flight need {kv_need / GIB:.1f} GiB, "
            f"over the {kv_have / GIB:.1f} GiB the weights leave"
        )
    return None


def search_space(
    base: Scenario,
    rate: float,
    tpot_ms: float | None,
    accelerators: Sequence[str],
    devices: Sequence[int],
    layout_mode: str = "auto",
    engines: Sequence[str | None] = (None,),
    capacity_factors: Sequence[float | str | None] = ("base",),
    load: Any = None,
    etps: Sequence[int] = (1,),
) -> Space:
    """Every candidate, pruned in closed form; ``load(overrides)`` resolves a candidate's
    scenario (the loader with the base file and its own overrides)."""
    from moesim.errors import ScenarioError

    space = Space()
    for acc in accelerators:
        for n in sorted(set(devices)):
            for dp, tp, ep, etp in layouts(base, n, layout_mode, etps):
                for eng in engines:
                    for cf in capacity_factors:
                        sets = [
                            *cluster_overrides(base, acc, n),
                            f"parallelism={{dp: {dp}, tp: {tp}, ep: {ep}"
                            + (f", etp: {etp}}}" if etp > 1 else "}"),
                        ]
                        if eng is not None:
                            sets.append(f"workload.engine={eng}")
                        if cf != "base":
                            sets.append(f"policies.capacity_factor={'null' if cf is None else cf}")
                            if cf is not None and base.policies.overflow == "dropless":
                                sets.append("policies.overflow=drop")  # a factor caps: drop
                            if cf is None and base.policies.overflow != "dropless":
                                sets.append("policies.overflow=dropless")
                        cand = Candidate(acc, n, dp, tp, ep, etp, eng, cf, tuple(sets))
                        try:
                            s = load(list(sets))
                        except ScenarioError as exc:
                            space.pruned.append(Pruned(cand, _first(exc)))
                            continue
                        why = closed_form_reason(s, rate, tpot_ms)
                        if why is None:
                            space.survivors.append(cand)
                            space.resolved[cand] = s
                        else:
                            space.pruned.append(Pruned(cand, why))
    return space


def _first(exc: Any) -> str:
    issue = exc.issues[0]
    more = f" (+{len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
    return f"{issue.path}: {issue.message}{more}"


def default_devices(base: Scenario) -> list[int]:
    """Device counts searched by default: 1, 2, 4 ... up to eight nodes of the preset."""
    per_node = int(getattr(base.cluster, "accelerators_per_node", 8))
    top = per_node * 8
    return [d for d in _powers_of_two(top) if d <= per_node or d % per_node == 0]
