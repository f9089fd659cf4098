"""Energy of a run: the integral of each device's power over its timeline, plus the network.

Each workload's records are turned into device-seconds per state
(:data:`moesim.energy.power.STATES`); energy is ``sum(seconds x power(state))``. What is
counted, per workload:

- ``layer``: every device of the cluster over the layer time. Expert GEMM intervals are
  compute- or memory-bound by the roofline of their grouped up-projection (the device's
  cost model: FLOPs over achievable FLOP/s against bytes over achievable bandwidth);
  shared-expert FFNs the same way; gate/permute and combine are memory-bound. The rest of
  the layer time is idle (waiting on the all-to-all counts as idle: the engine does not
  occupy the device while its flows are in flight). Network energy = link bytes x 8 x the
  link's ``energy_pj_per_bit`` where the preset has one (else 0, said in the notes).
- ``training`` (one step): per pipeline stage, its devices are busy during their forward
  and backward operations (the all-to-all and tensor-parallel parts communicating, the
  rest compute- or memory-bound by the roofline of a ``seq_len x d_model x d_model``
  product), idle for the rest of the pipeline (bubble and activation transfers);
  everyone communicates during the gradient sync and is memory-bound in the optimizer.
- ``serving``: every device is busy during each iteration (the ranks step in lock-step),
  its MoE part compute- or memory-bound by the roofline of the expert product at the
  iteration's tokens per expert, the rest by a ``tokens-per-rank x d_model x d_model``
  product; idle between iterations up to the end of the run (warm-up and drain included;
  at least ``duration_s``, the window the server is up for arrivals).

Besides the devices and the links (see :func:`infrastructure`):

- hosts: each host (a server's CPU side; one per node, or per ``chips_per_host`` chips of
  a torus) draws ``power_idle_w + busy_share x (power_busy_w - power_idle_w)`` for the
  whole duration, where ``busy_share`` is the fraction of device-seconds that are not idle
  (the host launches and feeds its accelerators' work); a host without ``power_busy_w``
  is left out, one without ``power_idle_w`` draws its busy power throughout;
- switches: a switch preset with a published ``power_w`` is charged pro rata of the ports
  the cluster attaches to it (``power_w / ports x attached ports``) for the whole duration
  (switches draw near-constant power whatever the traffic); presets without one are left
  out.

What is still left out is listed in :data:`HOST_NOTE` and in each account's notes.
Pure functions of the records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.cluster import NodesCluster
from moesim.config.energy import EnergyConfig
from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.cost.compute import Roofline
from moesim.energy.power import STATES, DevicePower, State, device_power
from moesim.engine.layer_sim import LayerRecords
from moesim.engine.serving import ServingRecords
from moesim.engine.training import TrainingRecords
from moesim.system import System

HOST_NOTE = (
    "left out (no sourced power figure in the catalog): host DRAM, storage and fans, NIC "
    "ASICs, the optics at the switch end of a link, and switches without a published "
    "power_w (none of the shipped switch presets has one)"
)


@dataclass(frozen=True)
class Infrastructure:
    """Hosts and switches of a cluster, as far as their power is published."""

    hosts: int
    """Hosts with a power figure (0 where the host preset has none)."""
    host_idle_w: float
    """Power of one host while its accelerators idle, watts."""
    host_busy_w: float
    """Power of one host while its accelerators are busy, watts."""
    switch_w: float
    """Switch power charged to the cluster (pro rata of attached ports), watts."""
    notes: tuple[str, ...] = ()

    def host_w(self, busy_share: float) -> float:
        """Power of all hosts when ``busy_share`` of the device-seconds are busy, watts."""
        share = min(max(busy_share, 0.0), 1.0)
        return self.hosts * (self.host_idle_w + share * (self.host_busy_w - self.host_idle_w))


NO_INFRASTRUCTURE = Infrastructure(0, 0.0, 0.0, 0.0)
"""Devices and links only (hosts and switches not counted)."""


def switch_ports(system: System) -> dict[str, float]:
    """Ports of each switch preset the cluster attaches (scale-up and fabric switches).

    NVSwitch: every device's scale-up links (the ``ports`` of its accelerator preset); a
    PCIe scale-up switch: one port per device plus the host uplink, per node; a fabric:
    one leaf port per NIC, and every leaf-to-spine uplink counted at both its ends (read
    from the built topology: an uplink edge carries ``uplinks x port_bandwidth_gbps``).
    A torus has no switch.
    """
    c = system.scenario.cluster
    out: dict[str, float] = {}
    if not isinstance(c, NodesCluster):
        return out
    if c.scale_up.kind == "nvswitch" and c.scale_up.switch:
        links = sum(p.count for p in c.accelerator.ports)
        out[c.scale_up.switch] = float(c.devices * links)
    elif c.scale_up.kind == "pcie" and c.scale_up.switch:
        out[c.scale_up.switch] = float(c.nodes * (c.accelerators_per_node + 1))
    fab = c.fabric
    if fab.kind != "none" and fab.switch:
        sw = c.switch_spec(fab.switch)
        ports = float(c.nodes * fab.nics_per_node)
        g = system.topology.graph
        for u, v, data in g.edges(data=True):
            if v == "spine" and g.nodes[u].get("kind") == "switch":
                ports += 2.0 * data["bandwidth_gbps"] / sw.port_bandwidth_gbps
        out[fab.switch] = out.get(fab.switch, 0.0) + ports
    return out


def infrastructure(system: System) -> Infrastructure:
    """Host and switch power of the scenario's cluster, with notes on what is missing."""
    host = system.topology.host_spec
    notes: list[str] = []
    hosts = 0
    idle_w = busy_w = 0.0
    if host.power_busy_w is not None:
        hosts = len(system.topology.hosts)
        busy_w = host.power_busy_w
        idle_w = host.power_idle_w if host.power_idle_w is not None else busy_w
        idle_note = (
            f"idle {idle_w:g} W"
            if host.power_idle_w is not None
            else "no idle figure: busy power all along (an upper bound)"
        )
        notes.append(
            f"hosts: {hosts} x ({idle_note}, busy {busy_w:g} W) by the share of busy "
            f"device-seconds ({host.power_source})"
        )
    else:
        notes.append("hosts: no power figure in the host preset; left out")
    switch_w = 0.0
    for name, ports in switch_ports(system).items():
        sw = system.scenario.cluster.switch_spec(name)
        if sw.power_w is None:
            notes.append(f"switches: {name} has no published power_w; left out")
            continue
        watts = sw.power_w / sw.ports * ports
        switch_w += watts
        notes.append(
            f"switches: {name} {sw.power_w:g} W / {sw.ports} ports x {ports:g} attached "
            f"ports = {watts:.6g} W ({sw.sources.get('power_w', sw.source)})"
        )
    return Infrastructure(hosts, idle_w, busy_w, switch_w, tuple(notes))


@dataclass(frozen=True)
class EnergyAccount:
    """Device-seconds per state and network energy of one run (IT equipment only)."""

    duration_s: float
    """Simulated time the account covers."""
    devices: int
    state_s: dict[State, float]
    """Device-seconds in each state, summed over devices."""
    power: DevicePower
    network_j: float
    notes: tuple[str, ...] = ()
    host_j: float = 0.0
    """Joules drawn by the hosts (see :class:`Infrastructure`)."""
    switch_j: float = 0.0
    """Joules drawn by the switches (pro rata of attached ports)."""

    @property
    def device_j_by_state(self) -> dict[State, float]:
        """Joules drawn by the devices in each state."""
        return {st: self.state_s[st] * self.power.watts(st) for st in STATES}

    @property
    def device_j(self) -> float:
        """Joules drawn by the devices."""
        return sum(self.device_j_by_state.values())

    @property
    def it_j(self) -> float:
        """Joules of the IT equipment counted (devices + links + hosts + switches)."""
        return self.device_j + self.network_j + self.host_j + self.switch_j

    @property
    def j_by_component(self) -> dict[str, float]:
        """Joules of each component of the IT equipment."""
        return {
            "devices": self.device_j,
            "hosts": self.host_j,
            "network_links": self.network_j,
            "switches": self.switch_j,
        }

    @property
    def busy_share(self) -> float:
        """Fraction of the device-seconds that are not idle (0 for an empty account)."""
        total = sum(self.state_s.values())
        return (total - self.state_s["idle"]) / total if total > 0 else 0.0

    def plus_idle(
        self, seconds: float, infra: Infrastructure, note: str | None = None
    ) -> EnergyAccount:
        """The account extended by ``seconds`` of every device idle (waiting on a
        checkpoint write, a failure's detection, a spare swap, a repair or a restart), the
        hosts at their idle power and the switches on."""
        idle = max(seconds, 0.0)
        state_s = dict(self.state_s)
        state_s["idle"] += idle * self.devices
        return EnergyAccount(
            duration_s=self.duration_s + idle,
            devices=self.devices,
            state_s=state_s,
            power=self.power,
            network_j=self.network_j,
            notes=self.notes + ((note,) if note else ()),
            host_j=self.host_j + infra.host_w(0.0) * idle,
            switch_j=self.switch_j + infra.switch_w * idle,
        )

    def scaled(self, factor: float) -> EnergyAccount:
        """The same account repeated ``factor`` times (e.g. over training steps)."""
        return EnergyAccount(
            duration_s=self.duration_s * factor,
            devices=self.devices,
            state_s={st: v * factor for st, v in self.state_s.items()},
            power=self.power,
            network_j=self.network_j * factor,
            notes=self.notes,
            host_j=self.host_j * factor,
            switch_j=self.switch_j * factor,
        )


@dataclass(frozen=True)
class FacilityEnergy:
    """An account at the facility: PUE overhead and carbon."""

    it_j: float
    overhead_j: float
    """Cooling and power delivery: ``it_j x (pue - 1)``."""
    total_j: float
    """``it_j x pue``."""
    kwh: float
    kgco2e: float
    """``kwh x carbon_intensity_g_per_kwh / 1000``."""


def facility(account: EnergyAccount, cfg: EnergyConfig) -> FacilityEnergy:
    """Apply the facility's PUE and the grid's carbon intensity to an account."""
    it = account.it_j
    total = it * cfg.pue
    kwh = total / 3.6e6
    return FacilityEnergy(
        it_j=it,
        overhead_j=it * (cfg.pue - 1.0),
        total_j=total,
        kwh=kwh,
        kgco2e=kwh * cfg.carbon_intensity_g_per_kwh / 1000.0,
    )


def account_from_busy(
    power: DevicePower,
    devices: int,
    duration_s: float,
    busy: list[tuple[int, State, float]],
    network_j: float = 0.0,
    notes: tuple[str, ...] = (),
    infra: Infrastructure = NO_INFRASTRUCTURE,
) -> EnergyAccount:
    """An account from busy spans ``(device, state, seconds)``; each device is idle for the
    rest of ``duration_s`` (never negative). Hosts draw ``infra.host_w(busy share)`` and
    switches ``infra.switch_w`` over ``duration_s``."""
    per = np.zeros((devices, len(STATES)))
    index = {st: i for i, st in enumerate(STATES)}
    for device, state, seconds in busy:
        if state == "idle":
            raise ValueError("busy spans cannot be idle")
        per[device, index[state]] += seconds
    per[:, index["idle"]] = np.maximum(duration_s - per.sum(axis=1), 0.0)
    state_s: dict[State, float] = {st: float(per[:, index[st]].sum()) for st in STATES}
    total = float(per.sum())
    share = (total - state_s["idle"]) / total if total > 0 else 0.0
    return EnergyAccount(
        duration_s,
        devices,
        state_s,
        power,
        network_j,
        notes + infra.notes,
        host_j=infra.host_w(share) * duration_s,
        switch_j=infra.switch_w * duration_s,
    )


def compute_bound(rf: Roofline, flops: float, nbytes: float) -> bool:
    """Whether a product of ``flops`` FLOPs streaming ``nbytes`` is compute-bound on ``rf``."""
    return flops / rf.flops_per_s >= nbytes / rf.bytes_per_s


def _product_state(rf: Roofline, m: float, k: int, n: int) -> State:
    b = rf.bytes_per_element
    return (
        "compute" if compute_bound(rf, 2.0 * m * k * n, b * (m * k + k * n + m * n)) else "memory"
    )


def network_energy_j(system: System, link_bytes: np.ndarray) -> tuple[float, str]:
    """Joules of the bytes carried by each link with a published pJ/bit, and a note."""
    g = system.topology.graph
    specs = system.scenario.cluster.links
    joules = 0.0
    uncovered = 0.0
    for i, (u, v) in enumerate(system.paths.edges):
        nbytes = float(link_bytes[i])
        if nbytes <= 0:
            continue
        spec = specs.get(g[u][v].get("link", ""))  # a spine uplink names its switch: none
        pj = spec.energy_pj_per_bit if spec is not None else None
        if pj is None:
            uncovered += nbytes
        else:
            joules += nbytes * 8 * pj * 1e-12
    if uncovered:
        note = (
            f"network: link bytes x 8 x energy_pj_per_bit; {uncovered:.6g} bytes on links "
            "without a published energy_pj_per_bit counted as 0 J"
        )
    else:
        note = "network: link bytes x 8 x energy_pj_per_bit"
    return joules, note


def _layer_communicating(rec: LayerRecords) -> list[tuple[int, State, float]]:
    """Seconds each device spends in the all-to-all kernels of one layer: dispatch from
    the end of its gate until it holds all its tokens, combine from the end of its experts
    until its own output is back (NCCL-style collectives occupy every participant for the
    whole exchange), minus the time it computes meanwhile (e.g. shared experts)."""
    tl = rec.timeline
    compute: dict[int, list[tuple[float, float]]] = {}
    for iv in tl.intervals:
        compute.setdefault(iv.device, []).append((iv.start_s, iv.end_s))
    out: list[tuple[int, State, float]] = []
    for d in set(tl.gate_end_s) | set(tl.expert_end_s):
        windows = []
        if d in tl.gate_end_s and d in tl.ready_s:
            windows.append((tl.gate_end_s[d], tl.ready_s[d]))
        if d in tl.expert_end_s and d in tl.rank_done_s:
            windows.append((tl.expert_end_s[d], tl.rank_done_s[d]))
        seconds = 0.0
        for a, b in windows:
            if b <= a:
                continue
            inside = sum(max(0.0, min(b, e) - max(a, st)) for st, e in compute.get(d, []))
            seconds += max(0.0, (b - a) - inside)
        if seconds > 0:
            out.append((d, "communicating", seconds))
    return out


def _moe_link_energy(system: System, link_bytes: np.ndarray | None, what: str) -> tuple[float, str]:
    """Link joules of a run's recorded MoE all-to-all bytes and the note saying so."""
    if link_bytes is None:
        return 0.0, "network: link bytes not recorded for this run; 0 J"
    joules, note = network_energy_j(system, link_bytes)
    return joules, f"{note} ({what})"


def layer_account(system: System, rec: LayerRecords) -> EnergyAccount:
    """Every device over the layer time (see the module docstring)."""
    s = system.scenario
    m = s.model
    rf = system.layer_costs.roofline
    layout = system.layout
    n_dev = len(system.topology.devices)
    loads = rec.timeline.expert_loads
    local_of = {layout.device(0, local): local for local in range(layout.stage_ranks)}
    up_n = (2 if m.activation in ("swiglu", "geglu") else 1) * (m.expert_d_ff // layout.etp)
    b = rf.bytes_per_element
    busy: list[tuple[int, State, float]] = []
    for iv in rec.timeline.intervals:
        state: State = "memory"
        if iv.name == "experts" and iv.device in loads:
            n = loads[iv.device][loads[iv.device] > 0].astype(float)
            flops = 2.0 * n.sum() * m.d_model * up_n
            nbytes = b * (n.sum() * m.d_model + len(n) * m.d_model * up_n + n.sum() * up_n)
            # grouped kernels reach these fractions of the product rates
            grouped = compute_bound(
                rf, flops / rf.grouped_compute_factor, nbytes / rf.grouped_memory_factor
            )
            state = "compute" if grouped else "memory"
        elif iv.name == "shared experts" and iv.device in local_of:
            tokens = float(rec.routing.tokens_per_rank[local_of[iv.device]])
            state = _product_state(rf, tokens, m.d_model, m.shared_d_ff * m.shared_experts)
        busy.append((iv.device, state, iv.end_s - iv.start_s))
    busy += _layer_communicating(rec)
    network_j, note = network_energy_j(system, rec.link_bytes)
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        rec.time_s,
        busy,
        network_j,
        (
            "layer: expert GEMMs compute- or memory-bound by the roofline; gate, permute and "
            "combine memory-bound; a device's all-to-all (from its gate's end until all its "
            "tokens have arrived, and from its experts' end until its combined output is "
            "back) communicating, outside its compute intervals; the rest idle",
            note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )


def training_account(system: System, w: TrainingWorkload, rec: TrainingRecords) -> EnergyAccount:
    """One training step of every device (see the module docstring)."""
    s = system.scenario
    m = s.model
    layout = system.layout
    rf = system.layer_costs.roofline
    n_dev = len(system.topology.devices)
    busy_stage = np.zeros(len(rec.stages))
    for stage, _, _, start, end in rec.ops:
        busy_stage[stage] += end - start
    work: State = _product_state(rf, w.seq_len * w.micro_batch_sequences, m.d_model, m.d_model)
    busy: list[tuple[int, State, float]] = []
    for stage, cost in enumerate(rec.stages):
        comm = min(
            w.microbatches * (cost.a2a_s + cost.tp_s + cost.gather_s), float(busy_stage[stage])
        )
        for local in range(layout.stage_ranks):
            d = layout.device(stage, local)
            busy.append((d, work, float(busy_stage[stage]) - comm))
            busy.append((d, "communicating", comm))
    for d in range(n_dev):
        busy.append((d, "communicating", rec.grad_sync_s))
        busy.append((d, "memory", rec.optimizer_s))
    network_j, link_note = _moe_link_energy(
        system,
        rec.moe_link_bytes,
        "the MoE all-to-alls' bytes; gradient all-reduces, ZeRO gathers, tensor-parallel "
        "collectives and pipeline transfers not counted",
    )
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        rec.step_s,
        busy,
        network_j,
        (
            f"training: forward/backward {work}-bound by the roofline of a "
            f"{w.seq_len * w.micro_batch_sequences} x {m.d_model} x {m.d_model} product, "
            "all-to-all, tensor-parallel and gradient sync communicating, optimizer "
            "memory-bound, pipeline bubble idle",
            link_note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )


def serving_account(system: System, rec: ServingRecords) -> EnergyAccount:
    """Every device over the whole serving run (see the module docstring)."""
    s = system.scenario
    m = s.model
    layout = system.layout
    rf = system.layer_costs.roofline
    n_dev = len(system.topology.devices)
    it = rec.iterations
    b = rf.bytes_per_element
    tokens = it.batch_tokens.astype(float)
    # the rest of the iteration: weight products over the tokens of one DP rank
    m_rank = tokens / max(rec.dp, 1)
    k = m.d_model
    other_bound = (
        2.0 * m_rank * k * k / rf.flops_per_s >= b * (2 * m_rank * k + k * k) / rf.bytes_per_s
    )
    # the experts: tokens per expert through the (sharded) up-projection
    n_ff = (2 if m.activation in ("swiglu", "geglu") else 1) * (m.expert_d_ff // layout.etp)
    m_exp = tokens * m.top_k / m.experts
    moe_bound = (
        2.0 * m_exp * k * n_ff / rf.flops_per_s
        >= b * (m_exp * k + k * n_ff + m_exp * n_ff) / rf.bytes_per_s
    )
    moe_all = np.minimum(it.moe_s, it.duration_s)
    comm_s = np.minimum(it.moe_comm_s, moe_all)
    moe_s = moe_all - comm_s
    other_s = it.duration_s - moe_all
    seconds: dict[State, float] = {
        "compute": float(moe_s[moe_bound].sum() + other_s[other_bound].sum()),
        "memory": float(moe_s[~moe_bound].sum() + other_s[~other_bound].sum()),
        "communicating": float(comm_s.sum()),
    }
    busy: list[tuple[int, State, float]] = [
        (d, st, v) for d in range(n_dev) for st, v in seconds.items()
    ]
    w = s.workload
    # the server is up for the arrival window at least, even if the last request ends early
    window_s = max(rec.end_s, w.duration_s) if isinstance(w, ServingWorkload) else rec.end_s
    network_j, link_note = _moe_link_energy(
        system,
        rec.moe_link_bytes,
        "the MoE all-to-alls' expected bytes at each iteration's batch size; "
        "tensor-parallel collectives not counted",
    )
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        window_s,
        busy,
        network_j,
        (
            "serving: each iteration compute- or memory-bound by the roofline (MoE part at "
            "its tokens per expert, the rest at its tokens per DP rank), the MoE layers' "
            "all-to-all (dispatch + combine on their critical path) communicating; idle "
            "between iterations, over the whole run (at least duration_s) including "
            "warm-up and drain",
            link_note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )
