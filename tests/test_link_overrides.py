"""Link and switch specs are part of the resolved scenario, and overridable (issue 9).

The loader fills ``cluster.links`` / ``cluster.switches`` from the catalog presets the
cluster names; the topology and the energy account read them from there, so a resolved
``scenario.yaml`` rebuilds the same system and an override reaches the simulation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter

import moesim
from moesim.catalog import raw_preset
from moesim.config.cluster import ClusterConfig, NodesCluster, TorusCluster
from moesim.energy.account import infrastructure, network_energy_j, switch_ports
from moesim.errors import ScenarioError
from moesim.loader import load_scenario, scenario_from_dict
from moesim.loader.presets import expand_presets
from moesim.system import build_system
from moesim.topology.graph import build

DGX = """\
name: t
seed: 1
cluster: dgx-h100
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop}
workload: {kind: layer, tokens: 2048}
"""

A100 = DGX.replace("cluster: dgx-h100", "cluster: dgx-a100")

FAT_TREE: dict[str, Any] = {
    "name": "ft",
    "seed": 2,
    "cluster": {"preset": "h100-fat-tree", "nodes": 2},
    "model": "mixtral-8x7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 16, "ep": 8},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
    "workload": {"kind": "layer", "tokens": 1024},
}

VOLATILE = {"wall_s", "sim_seconds_per_wall_second", "events_per_s"}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, overrides)
    return [str(i) for i in info.value.issues]


def _edge(scenario: moesim.Scenario, a: str, b: str) -> float:
    return float(build(scenario.cluster).graph.edges[a, b]["bandwidth_gbps"])


# ------------------------------------------------------------- (a) in the resolved form


def test_resolved_scenario_holds_every_link_and_switch_spec(write) -> None:
    """A DGX H100's resolved scenario holds the NVLink4, PCIe Gen5 and NVSwitch specs with
    their sources, equal to the catalog presets, keyed by the names the fields use."""
    dumped = load_scenario(write("s.yaml", DGX)).model_dump(mode="json")["cluster"]
    assert list(dumped["links"]) == ["nvlink4", "pcie-gen5-x16"]
    assert list(dumped["switches"]) == ["nvswitch-gen3"]
    for table, kind in (("links", "links"), ("switches", "switches")):
        for name, spec in dumped[table].items():
            raw = raw_preset(kind, name)
            assert spec["source"] == raw["source"]
            assert {k: spec[k] for k in raw} == raw  # every catalog figure, unchanged
    assert dumped["links"]["nvlink4"]["effective_bandwidth_gbps"] == 17.97


def test_fabric_and_torus_specs_are_resolved() -> None:
    """A fat-tree cluster gains its NIC link and fabric switch; a TPU torus its ICI link."""
    ft = scenario_from_dict(FAT_TREE).cluster
    assert isinstance(ft, NodesCluster)
    assert list(ft.links) == ["nvlink4", "pcie-gen5-x16", "ib-ndr"]
    assert list(ft.switches) == ["nvswitch-gen3", "ib-quantum2-ndr"]
    data: dict[str, Any] = {"cluster": "tpu-v4-1024"}
    expand_presets(data, {})
    torus = TypeAdapter(ClusterConfig).validate_python(data["cluster"])
    assert isinstance(torus, TorusCluster)
    assert torus.link in torus.links and torus.switches == {}
    assert torus.links[torus.link].kind == "ici"


def test_topology_builds_without_the_catalog() -> None:
    """topology.graph imports nothing of moesim.catalog (it builds from the config)."""
    code = (
        "import sys, moesim.topology.graph, moesim.topology.paths; "
        "print([m for m in sys.modules if m.startswith('moesim.catalog')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- (b) overrides reach the run


def test_yaml_override_of_a_measured_link_slows_the_layer(write) -> None:
    """Halving NVLink4's delivered rate in the YAML halves the GPU-NVSwitch edge and makes
    the all-to-all, so the layer, slower; the changed figure is cited where it was set."""
    base = load_scenario(write("a.yaml", DGX))
    text = DGX.replace(
        "cluster: dgx-h100",
        "cluster:\n  preset: dgx-h100\n  links:\n    nvlink4: {effective_bandwidth_gbps: 8.985}",
    )
    p = write("b.yaml", text)
    slow = load_scenario(p)
    assert _edge(slow, "n0.gpu0", "n0.nvswitch") == pytest.approx(
        _edge(base, "n0.gpu0", "n0.nvswitch") / 2
    )
    nv = slow.cluster.links["nvlink4"]
    assert nv.sources["effective_bandwidth_gbps"].startswith(f"set at {p}:6:")
    assert "17.97" in nv.sources["effective_bandwidth_gbps"]
    a, b = moesim.run(base).summary, moesim.run(slow).summary
    assert b["breakdown_ms"]["dispatch"] > a["breakdown_ms"]["dispatch"]
    assert b["time_ms"] > a["time_ms"]
    assert b["busiest_link"]["bandwidth_gbps"] == pytest.approx(
        a["busiest_link"]["bandwidth_gbps"] / 2
    )


def test_set_override_of_a_datasheet_link_speeds_the_layer(write) -> None:
    """--set cluster.links.nvlink3.bandwidth_gbps=50 (NVLink3 has no measured rate) doubles
    a DGX A100's NVLink edges and shortens the all-to-all and the layer."""
    p = write("a100.yaml", A100)
    base = load_scenario(p)
    fast = load_scenario(p, ["cluster.links.nvlink3.bandwidth_gbps=50"])
    assert _edge(fast, "n0.gpu0", "n0.nvswitch") == pytest.approx(
        2 * _edge(base, "n0.gpu0", "n0.nvswitch")
    )
    assert (
        fast.cluster.links["nvlink3"]
        .sources["bandwidth_gbps"]
        .startswith("set at --set cluster.links.nvlink3.bandwidth_gbps=50")
    )
    a, b = moesim.run(base).summary, moesim.run(fast).summary
    assert b["breakdown_ms"]["dispatch"] < a["breakdown_ms"]["dispatch"]
    assert b["time_ms"] < a["time_ms"]


def test_switch_port_bandwidth_override_reaches_the_spine() -> None:
    """The fabric switch's port bandwidth sets the leaf-spine uplinks (16 nodes, 2 leaves)."""
    data = {**FAT_TREE, "cluster": {"preset": "h100-fat-tree", "nodes": 16}}
    data["parallelism"] = {"dp": 128, "ep": 8}
    base = scenario_from_dict(data).cluster
    data["cluster"] = {
        **data["cluster"],
        "switches": {"ib-quantum2-ndr": {"port_bandwidth_gbps": 25}},
    }
    slow = scenario_from_dict(data).cluster
    g0, g1 = build(base).graph, build(slow).graph
    leaf = next(u for u, v in g0.edges if v == "spine")
    assert g1.edges[leaf, "spine"]["bandwidth_gbps"] == pytest.approx(
        g0.edges[leaf, "spine"]["bandwidth_gbps"] / 2
    )


def test_switch_power_and_link_energy_come_from_the_scenario() -> None:
    """A switch power and a link pJ/bit given in the scenario are what the energy account
    charges (power_w / ports per attached port; bytes x 8 x pJ/bit)."""
    data = {
        **FAT_TREE,
        "cluster": {
            "preset": "h100-fat-tree",
            "nodes": 2,
            "switches": {"nvswitch-gen3": {"power_w": 128.0}},
            "links": {"ib-ndr": {"energy_pj_per_bit": 40.0}},
        },
    }
    system = build_system(scenario_from_dict(data))
    ports = switch_ports(system)
    assert ports["nvswitch-gen3"] == 16 * 18
    infra = infrastructure(system)
    ib_sw = system.scenario.cluster.switch_spec("ib-quantum2-ndr")
    ib_w = (ib_sw.power_w or 0.0) / ib_sw.ports * ports["ib-quantum2-ndr"]
    assert infra.switch_w == pytest.approx(128.0 / 64 * 16 * 18 + ib_w)
    g = system.topology.graph
    edges = list(system.paths.edges)
    ib = next(i for i, (u, v) in enumerate(edges) if g[u][v].get("link") == "ib-ndr")
    nbytes = np.zeros(len(edges))
    nbytes[ib] = 1.0e9
    joules, _ = network_energy_j(system, nbytes)
    assert joules == pytest.approx(1.0e9 * 8 * 40.0e-12)


def test_an_entry_may_name_another_preset(write) -> None:
    """``links: {pcie-gen5-x16: pcie-gen4-x16}`` puts the Gen4 figures under the name the
    accelerator uses: the host link edges take Gen4's delivered rate."""
    text = DGX.replace(
        "cluster: dgx-h100",
        "cluster:\n  preset: dgx-h100\n  links: {pcie-gen5-x16: {preset: pcie-gen4-x16}}",
    )
    s = load_scenario(write("g4.yaml", text))
    spec = s.cluster.links["pcie-gen5-x16"]
    assert spec.name == "pcie-gen5-x16" and spec.bandwidth_gbps == 31.5
    assert _edge(s, "n0.gpu0", "n0.pcie") == pytest.approx(27.5)


# ------------------------------------------------------------- (c) bad overrides, located


def test_negative_bandwidth_is_located_at_the_set(write) -> None:
    """A negative link bandwidth from --set names the field and the --set."""
    p = write("a100.yaml", A100)
    errs = _errors(p, ("cluster.links.nvlink3.bandwidth_gbps=-5",))
    assert errs == [
        "--set cluster.links.nvlink3.bandwidth_gbps=-5: "
        "cluster.links.nvlink3.bandwidth_gbps: must be > 0.0, got -5"
    ]


def test_bad_switch_value_in_yaml_is_located_at_its_line(write) -> None:
    """A switch override written in the YAML is reported at its line and column."""
    text = DGX.replace(
        "cluster: dgx-h100",
        "cluster:\n  preset: dgx-h100\n  switches:\n    nvswitch-gen3:\n      ports: 0",
    )
    p = write("sw.yaml", text)
    assert _errors(p) == [f"{p}:7:7: cluster.switches.nvswitch-gen3.ports: must be >= 1, got 0"]


def test_unknown_field_of_a_link_is_named(write) -> None:
    """A misspelt field of a link spec is rejected at the --set, naming the field."""
    p = write("a100.yaml", A100)
    errs = _errors(p, ("cluster.links.nvlink3.bandwith_gbps=50",))
    assert len(errs) == 1
    assert errs[0].startswith(
        "--set cluster.links.nvlink3.bandwith_gbps=50: cluster.links.nvlink3.bandwith_gbps: "
        "unknown key (did you mean 'bandwidth_gbps'?)"
    )


def test_datasheet_rate_of_a_measured_link_needs_its_delivered_rate(write) -> None:
    """Changing NVLink4's bandwidth_gbps alone would change nothing (the topology uses its
    measured rate): the error says so, at the --set; giving both is accepted."""
    p = write("s.yaml", DGX)
    (err,) = _errors(p, ("cluster.links.nvlink4.bandwidth_gbps=50",))
    assert err.startswith(
        "--set cluster.links.nvlink4.bandwidth_gbps=50: cluster.links.nvlink4.bandwidth_gbps: "
        "nvlink4's measured effective_bandwidth_gbps (17.97 GB/s)"
    )
    assert "cluster.links.nvlink4.effective_bandwidth_gbps" in err
    s = load_scenario(
        p,
        [
            "cluster.links.nvlink4.bandwidth_gbps=50",
            "cluster.links.nvlink4.effective_bandwidth_gbps=null",
        ],
    )
    assert _edge(s, "n0.gpu0", "n0.nvswitch") == pytest.approx(18 * 50)


def test_effective_rate_above_datasheet_is_refused(write) -> None:
    """A delivered rate above the datasheet rate is refused, at the field."""
    p = write("s.yaml", DGX)
    errs = _errors(p, ("cluster.links.nvlink4.effective_bandwidth_gbps=30",))
    assert errs == [
        "--set cluster.links.nvlink4.effective_bandwidth_gbps=30: "
        "cluster.links.nvlink4.effective_bandwidth_gbps: 30 GB/s exceeds bandwidth_gbps "
        "(25 GB/s): a link delivers at most its datasheet rate"
    ]


def test_spec_for_a_link_the_cluster_does_not_use_is_refused(write) -> None:
    """An override of a link the cluster does not name (nvlink3 on an H100) is an error
    at the override, naming the links the cluster uses."""
    p = write("s.yaml", DGX)
    assert _errors(p, ("cluster.links.nvlink3.bandwidth_gbps=30",)) == [
        "--set cluster.links.nvlink3.bandwidth_gbps=30: cluster.links.nvlink3: the cluster "
        "names no link 'nvlink3', so this spec would go unused "
        "(it names: nvlink4, pcie-gen5-x16)"
    ]


def test_unknown_link_name_is_located_at_the_field_naming_it(write) -> None:
    """A host link that is no preset (and not defined in cluster.links) is reported where
    it is named, with the closest preset."""
    p = write("s.yaml", DGX)
    (err,) = _errors(p, ("cluster.accelerator.host_link=pcie-gen5-x61",))
    assert err.startswith(
        "--set cluster.accelerator.host_link=pcie-gen5-x61: cluster.accelerator.host_link: "
        "unknown link preset 'pcie-gen5-x61' (did you mean 'pcie-gen5-x16'?)"
    )
    (err,) = _errors(p, ("cluster.scale_up.switch=nvswitch-gen9",))
    assert "cluster.scale_up.switch: unknown switch preset 'nvswitch-gen9'" in err


def test_changing_a_link_name_takes_the_new_preset(write) -> None:
    """--set cluster.accelerator.host_link=pcie-gen4-x16 resolves the Gen4 spec in place
    of Gen5's."""
    s = load_scenario(write("s.yaml", DGX), ["cluster.accelerator.host_link=pcie-gen4-x16"])
    assert list(s.cluster.links) == ["nvlink4", "pcie-gen4-x16"]


# ------------------------------------------------------------- (d) rerunning a run folder


@pytest.mark.parametrize(
    "overrides",
    [(), ("cluster.links.nvlink4.effective_bandwidth_gbps=12",)],
    ids=["as-shipped", "overridden"],
)
def test_resolved_scenario_yaml_reproduces_the_summary(
    write, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """A run folder's scenario.yaml, loaded again, is the same scenario (the override and
    its citation included) and reproduces the summary figure for figure."""
    first = moesim.run(load_scenario(write("s.yaml", DGX), overrides))
    folder = first.write(tmp_path / "runs")
    again = load_scenario(folder / "scenario.yaml")
    assert again == first.scenario
    second = moesim.run(again)
    assert _clean(second.summary) == _clean(first.summary)
    assert json.loads((folder / "summary.json").read_text())["time_ms"] == first.summary["time_ms"]
    dumped = yaml.safe_load((folder / "scenario.yaml").read_text())
    assert "nvlink4" in dumped["cluster"]["links"]
    assert "nvswitch-gen3" in dumped["cluster"]["switches"]


def test_authoring_schema_takes_spec_entries_and_refuses_misspelt_fields() -> None:
    """`moesim schema`: a cluster's links / switches entries may be a preset name, a preset
    with overrides or some fields; a misspelt field or an unknown preset is refused."""
    import copy

    import jsonschema

    from moesim.loader.schema import authoring_schema

    schema = authoring_schema()
    cluster = scenario_from_dict(FAT_TREE).cluster.model_dump(mode="json")
    del cluster["links"], cluster["switches"]
    good: list[Any] = ["nvlink3", {"preset": "nvlink3", "latency_us": 1}, {"latency_us": 1}]
    for entry in good:
        jsonschema.validate({"cluster": {**cluster, "links": {"nvlink4": entry}}}, schema)
    jsonschema.validate(
        {"cluster": {**cluster, "switches": {"ib-quantum2-ndr": {"power_w": 1}}}}, schema
    )
    for entry in ({"bandwith_gbps": 9}, {"bandwidth_gbps": -9}, "nvlink9"):
        bad = copy.deepcopy(cluster)
        bad["links"] = {"nvlink4": entry}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"cluster": bad}, schema)
