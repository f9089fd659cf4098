"""Energy accounts: device-seconds per power state, host and switch power, link energy, and
the facility (PUE, carbon) around them; the per-workload accounts that fill them are in
:mod:`moesim.energy.workload_accounts`.

What is still left out is listed in :data:`HOST_NOTE` and in each account's notes.
Pure functions of the records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.cluster import NodesCluster
from moesim.config.energy import EnergyConfig
from moesim.cost.compute import Roofline
from moesim.energy.power import STATES, DevicePower, State
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
