"""The cluster: accelerators, how they are wired inside a node, the fabric between nodes, hosts.

Two shapes cover the catalog: ``kind: nodes`` (GPU servers with a scale-up domain such as
NVSwitch, and a scale-out fabric such as a fat-tree or rail-optimized InfiniBand) and
``kind: torus`` (TPU slices: chips on a 2-D/3-D torus of ICI links).

Fields name links and switches by name (``accelerator.ports[].link``,
``accelerator.host_link``, ``scale_up.switch``, ``fabric.nic``, ``fabric.switch``, a
torus's ``link``); the cluster's ``links`` and ``switches`` hold the spec of every name it
uses. The loader fills them from the catalog presets of those names (``moesim presets
links``), merged with what the scenario gives there, so a resolved scenario holds every
figure the topology and the energy account use, and a user can override one
(``--set cluster.links.nvlink4.effective_bandwidth_gbps=20``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from moesim.config.base import Frozen
from moesim.config.hardware import AcceleratorSpec, LinkSpec, SwitchSpec
from moesim.config.profile import DeviceProfile


class HostSpec(Frozen):
    """The CPU host the accelerators hang off: memory and storage tiers below HBM."""

    dram_gib: float = Field(gt=0)
    """Host DRAM capacity per host, GiB."""
    dram_bandwidth_gbps: float = Field(gt=0)
    """Host DRAM bandwidth per host, GB/s."""
    nvme_tib: float = Field(ge=0)
    """NVMe capacity per host, TiB (0 = none)."""
    nvme_read_gbps: float = Field(ge=0)
    """Aggregate NVMe sequential read bandwidth per host, GB/s."""
    nvme_write_gbps: float = Field(ge=0)
    """Aggregate NVMe sequential write bandwidth per host, GB/s."""
    source: str = Field(min_length=1)
    """Where these figures come from."""
    power_busy_w: float | None = Field(default=None, ge=0)
    """Power of the host (CPU sockets and what ``power_source`` names) while its
    accelerators are busy, watts; None where unpublished (hosts are then left out of the
    energy account, which says so)."""
    power_idle_w: float | None = Field(default=None, ge=0)
    """Host power while its accelerators are idle, watts; None = ``power_busy_w`` (no
    published idle figure: the host is charged its busy power all along, an upper bound)."""
    power_source: str | None = Field(default=None, min_length=1)
    """Where the host power figures come from (required with ``power_busy_w``)."""

    @model_validator(mode="after")
    def _power_is_cited(self) -> HostSpec:
        if self.power_busy_w is None:
            if self.power_idle_w is not None:
                raise ValueError("power_idle_w needs power_busy_w")
            return self
        if self.power_source is None:
            raise ValueError("power_busy_w is given without a citation in power_source")
        if self.power_idle_w is not None and self.power_idle_w > self.power_busy_w:
            raise ValueError(
                f"power_idle_w ({self.power_idle_w} W) must not exceed power_busy_w "
                f"({self.power_busy_w} W)"
            )
        return self


class ScaleUp(Frozen):
    """How the accelerators of one node are connected to each other."""

    kind: Literal["nvswitch", "mesh", "pcie"]
    """nvswitch: every GPU's scale-up ports go to a non-blocking switch;
    mesh: every pair of GPUs is joined directly (the GPU's ports split evenly over peers);
    pcie: GPUs talk through the host's PCIe switch (no NVLink)."""
    switch: str | None = None
    """Switch for ``nvswitch`` and ``pcie`` (e.g. nvswitch-gen3): a key of
    ``cluster.switches``, which the loader fills from the preset of that name."""


class Fabric(Frozen):
    """The scale-out network between nodes."""

    kind: Literal["none", "fat_tree", "rail_optimized"] = "none"
    """none: a single node; fat_tree: NICs to leaf switches, leaves to spines;
    rail_optimized: NIC i of every node goes to rail switch i, rails joined by spines."""
    nic: str | None = None
    """Link of each NIC (e.g. ib-ndr): a key of ``cluster.links``."""
    nics_per_node: int = Field(default=0, ge=0)
    """NICs per node (one per GPU on DGX-class servers)."""
    switch: str | None = None
    """Switch of leaves and spines (e.g. ib-quantum2-ndr): a key of ``cluster.switches``."""
    oversubscription: float = Field(default=1.0, ge=1.0)
    """Leaf downlink:uplink bandwidth ratio (1 = non-blocking)."""


def _spec(table: dict[str, Any], field: str, name: str) -> Any:
    try:
        return table[name]
    except KeyError:
        have = ", ".join(table) or "nothing"
        raise KeyError(f"no spec named {name!r} in cluster.{field} (it holds: {have})") from None


def _check_specs(
    named_links: list[tuple[str, str]],
    named_switches: list[tuple[str, str]],
    links: dict[str, LinkSpec],
    switches: dict[str, SwitchSpec],
) -> None:
    """Every named link and switch has a spec, under its own name, and every spec is named."""
    problems: list[str] = []
    for table, what, named, specs in (
        ("links", "link", named_links, links),
        ("switches", "switch", named_switches, switches),
    ):
        used = {name for _, name in named}
        for where, name in named:
            if name not in specs:
                problems.append(f"{table}: no spec for the {what} {name!r} that {where} names")
        for key, spec in specs.items():
            if spec.name != key:
                problems.append(f"{table}: the entry {key!r} has name {spec.name!r}; use its key")
            if key not in used:
                names = ", ".join(sorted(used)) or "none"
                problems.append(f"{table}: the cluster names no {what} {key!r} (it names: {names})")
    if problems:
        raise ValueError("\n".join(dict.fromkeys(problems)))


def _accelerator_links(acc: AcceleratorSpec) -> list[tuple[str, str]]:
    out = [(f"accelerator.ports[{i}].link", p.link) for i, p in enumerate(acc.ports)]
    if acc.host_link is not None:
        out.append(("accelerator.host_link", acc.host_link))
    return out


class _SpecTables:
    """Lookups in a cluster's ``links`` and ``switches`` tables (both cluster kinds)."""

    if TYPE_CHECKING:  # the fields themselves are declared by each cluster kind
        links: dict[str, LinkSpec]
        switches: dict[str, SwitchSpec]

    def link_spec(self, name: str) -> LinkSpec:
        """The spec of the link ``name`` (KeyError naming the ones the cluster holds)."""
        spec: LinkSpec = _spec(self.links, "links", name)
        return spec

    def switch_spec(self, name: str) -> SwitchSpec:
        """The spec of the switch ``name`` (KeyError naming the ones the cluster holds)."""
        spec: SwitchSpec = _spec(self.switches, "switches", name)
        return spec


class NodesCluster(_SpecTables, Frozen):
    """A cluster of GPU servers (one or more nodes)."""

    kind: Literal["nodes"] = "nodes"
    name: str = "custom"
    """Preset name or a label."""
    source: str = Field(default="user-defined", min_length=1)
    """Where this system's description comes from."""
    accelerator: AcceleratorSpec
    """The accelerator of every node (a preset name, or a preset with overrides)."""
    nodes: int = Field(default=1, ge=1)
    """Number of servers."""
    accelerators_per_node: int = Field(ge=1)
    """Accelerators per server."""
    scale_up: ScaleUp
    """The intra-node interconnect."""
    fabric: Fabric = Fabric()
    """The inter-node network."""
    host: HostSpec
    """Each server's CPU host."""
    profile: DeviceProfile | None = None
    """A measured device profile (``moesim calibrate``): a path relative to the scenario
    (read at load time and embedded) or inline; default: the accelerator preset's own."""
    expert_kernel: Literal["grouped", "loop"] = "grouped"
    """How the software runs a device's experts: one grouped GEMM per projection, or a loop
    of per-expert products (as simple implementations do)."""
    launch: Literal["eager", "graph"] = "eager"
    """How kernels are launched: one by one from the host (eager, as in training), or
    replayed from a captured CUDA graph (as inference servers run decode steps)."""
    links: dict[str, LinkSpec] = Field(default_factory=dict)
    """The spec of every link the cluster's fields name, keyed by that name. The loader fills
    it from the catalog's link presets; an entry the scenario gives overrides the preset of
    its name (``nvlink4: {effective_bandwidth_gbps: 20}``), names another preset
    (``{preset: NAME, ...overrides}``) or, under a name that is no preset, defines the link."""
    switches: dict[str, SwitchSpec] = Field(default_factory=dict)
    """The spec of every switch the cluster's fields name, keyed by that name (filled and
    overridden as ``links`` are)."""

    @property
    def devices(self) -> int:
        return self.nodes * self.accelerators_per_node

    def named_links(self) -> list[tuple[str, str]]:
        """(field, link name) of every link the cluster's fields name."""
        out = _accelerator_links(self.accelerator)
        if self.fabric.nic is not None:
            out.append(("fabric.nic", self.fabric.nic))
        return out

    def named_switches(self) -> list[tuple[str, str]]:
        """(field, switch name) of every switch the cluster's fields name."""
        out = []
        if self.scale_up.switch is not None:
            out.append(("scale_up.switch", self.scale_up.switch))
        if self.fabric.switch is not None:
            out.append(("fabric.switch", self.fabric.switch))
        return out

    @model_validator(mode="after")
    def _specs_match_names(self) -> NodesCluster:
        _check_specs(self.named_links(), self.named_switches(), self.links, self.switches)
        return self


class TorusCluster(_SpecTables, Frozen):
    """A TPU slice: chips on a 2-D or 3-D torus of ICI links, hosts with a few chips each."""

    kind: Literal["torus"]
    name: str = "custom"
    source: str = Field(default="user-defined", min_length=1)
    accelerator: AcceleratorSpec
    """The chip (a preset name, or a preset with overrides)."""
    dims: tuple[int, ...] = Field(min_length=1, max_length=3)
    """Chips along each torus dimension, e.g. [4, 4] or [8, 8, 16]."""
    link: str
    """ICI link between neighbouring chips: a key of ``cluster.links``."""
    links_per_neighbor: int = Field(default=1, ge=1)
    """Parallel ICI links between two neighbouring chips."""
    wraparound: bool = True
    """Whether each dimension closes into a ring (a torus) or stays open (a mesh)."""
    chips_per_host: int = Field(default=4, ge=1)
    """Chips attached to each CPU host."""
    host: HostSpec
    profile: DeviceProfile | None = None
    expert_kernel: Literal["grouped", "loop"] = "grouped"
    launch: Literal["eager", "graph"] = "eager"
    links: dict[str, LinkSpec] = Field(default_factory=dict)
    """The spec of every link the cluster's fields name, keyed by that name. The loader fills
    it from the catalog's link presets; an entry the scenario gives overrides the preset of
    its name (``nvlink4: {effective_bandwidth_gbps: 20}``), names another preset
    (``{preset: NAME, ...overrides}``) or, under a name that is no preset, defines the link."""
    switches: dict[str, SwitchSpec] = Field(default_factory=dict)
    """The spec of every switch the cluster's fields name, keyed by that name (filled and
    overridden as ``links`` are)."""

    @property
    def devices(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    def named_links(self) -> list[tuple[str, str]]:
        """(field, link name) of every link the cluster's fields name."""
        return [*_accelerator_links(self.accelerator), ("link", self.link)]

    def named_switches(self) -> list[tuple[str, str]]:
        """A torus names no switch."""
        return []

    @model_validator(mode="after")
    def _specs_match_names(self) -> TorusCluster:
        _check_specs(self.named_links(), self.named_switches(), self.links, self.switches)
        return self


ClusterConfig = Annotated[NodesCluster | TorusCluster, Field(discriminator="kind")]
