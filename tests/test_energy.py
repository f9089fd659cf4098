"""Energy and carbon: the power model, the accountant and the summary section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim
from moesim.catalog import names
from moesim.catalog.hardware import accelerator
from moesim.config.energy import EnergyConfig
from moesim.energy.account import (
    Infrastructure,
    account_from_busy,
    facility,
    infrastructure,
    network_energy_j,
    switch_ports,
)
from moesim.energy.power import MEASUREMENT_FILE, STATES, DevicePower, State, device_power
from moesim.engine.layer_sim import LayerRecords
from moesim.loader import scenario_from_dict

ROOT = Path(__file__).resolve().parent.parent
POWER = DevicePower(
    idle_w=100.0, compute_w=700.0, memory_w=400.0, communicating_w=400.0, source="t"
)

ONE_GPU_LAYER: dict[str, Any] = {
    "name": "one",
    "seed": 3,
    "cluster": "single-h100",
    "model": "mixtral-8x7b",
    "routing": {"kind": "uniform"},
    "parallelism": {"dp": 1, "ep": 1},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
    "workload": {"kind": "layer", "tokens": 16384},
}


def _run(base: dict[str, Any], **sections: Any) -> moesim.Result:
    return moesim.run(scenario_from_dict({**base, **sections}))


def _serving(rate: float, duration_s: float = 3.0) -> dict[str, Any]:
    return {
        "name": "srv",
        "seed": 5,
        "cluster": "single-h100",
        "model": "olmoe-1b-7b",
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": 1, "ep": 1},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {
            "kind": "serving",
            "duration_s": duration_s,
            "arrival": {"kind": "poisson", "rate_per_s": rate},
            "prompt_tokens": {"kind": "constant", "value": 128},
            "output_tokens": {"kind": "constant", "value": 8},
        },
    }


def test_layer_energy_is_the_integral_of_power_over_the_timeline() -> None:
    """One-GPU layer: J = idle x free time + copy W x glue intervals + GEMM W x experts."""
    result = _run(ONE_GPU_LAYER)
    rec = result.records
    assert isinstance(rec, LayerRecords)
    p = device_power(accelerator("h100-sxm"))
    # 16384 tokens over 8 experts: ~4096 rows per expert, far above the H100's ridge
    # (~260 FLOP/byte), so the expert interval is compute-bound; the rest is memory-bound
    expected = 0.0
    busy = 0.0
    for iv in rec.timeline.intervals:
        dur = iv.end_s - iv.start_s
        busy += dur
        expected += dur * (p.compute_w if iv.name == "experts" else p.memory_w)
    expected += (rec.time_s - busy) * p.idle_w
    energy = result.summary["energy"]
    assert energy["energy_j_by_component"]["devices"] == pytest.approx(expected, rel=1e-8)
    # the host: one GPU's share of a DGX H100's CPU sockets, 700 W / 8, over the layer
    host = result.system.topology.host_spec.power_busy_w
    assert host == 87.5
    assert energy["energy_j_by_component"]["hosts"] == pytest.approx(host * rec.time_s)
    total = expected + host * rec.time_s
    assert energy["energy_j"] == pytest.approx(total, rel=1e-8)
    assert energy["average_power_w"] == pytest.approx(total / rec.time_s, rel=1e-8)
    assert energy["energy_per_token_j"] == pytest.approx(total / 16384, rel=1e-8)


def test_all_idle_timeline_costs_idle_power_only() -> None:
    """An accountant with no busy span charges idle watts x devices x duration."""
    account = account_from_busy(POWER, devices=4, duration_s=2.5, busy=[])
    assert account.device_j == pytest.approx(100.0 * 4 * 2.5)
    assert account.device_j_by_state["idle"] == account.device_j


def test_zero_load_serving_costs_idle_power_only() -> None:
    """A serving run where no request arrives draws idle power over its window only."""
    result = _run(_serving(rate=1e-9, duration_s=2.0))
    energy = result.summary["energy"]
    assert result.summary["arrived_requests"] == 0
    idle_w = device_power(accelerator("h100-sxm")).idle_w
    host_w = result.system.topology.host_spec.power_busy_w  # no idle figure: charged all along
    assert energy["energy_j_by_component"]["devices"] == pytest.approx(idle_w * 2.0, rel=1e-8)
    assert energy["energy_j"] == pytest.approx((idle_w + host_w) * 2.0, rel=1e-8)
    assert all(energy["energy_j_by_state"][s] == 0 for s in STATES if s != "idle")
    assert energy["energy_per_token_j"] is None


def test_pue_scales_facility_energy_exactly() -> None:
    """Total = IT energy x PUE, and the overhead is IT x (PUE - 1)."""
    account = account_from_busy(POWER, 2, 1.0, [(0, "compute", 0.5), (1, "memory", 0.25)])
    base = facility(account, EnergyConfig(pue=1.0))
    scaled = facility(account, EnergyConfig(pue=1.37))
    assert base.total_j == account.it_j
    assert scaled.total_j == pytest.approx(1.37 * base.total_j, rel=1e-12)
    assert scaled.overhead_j == pytest.approx(0.37 * base.total_j, rel=1e-12)


def test_carbon_is_kwh_times_intensity() -> None:
    """kgCO2e in the summary = kWh x gCO2e/kWh / 1000, kWh = J / 3.6e6."""
    energy = _run(ONE_GPU_LAYER, energy={"pue": 1.2, "carbon_intensity_g_per_kwh": 380.0}).summary[
        "energy"
    ]
    assert energy["kwh"] == pytest.approx(energy["energy_j"] / 3.6e6, rel=1e-8)
    assert energy["kgco2e"] == pytest.approx(energy["kwh"] * 380.0 / 1000, rel=1e-8)
    comp = energy["energy_j_by_component"]
    assert sum(comp.values()) == pytest.approx(energy["energy_j"], rel=1e-8)


def test_h100_powers_equal_the_measurement_records() -> None:
    """The H100's idle, compute and memory watts are the jsonl's energy records."""
    lines = (ROOT / MEASUREMENT_FILE).read_text("utf-8").splitlines()
    records = {
        r["label"]: r["watts"]
        for r in map(json.loads, filter(str.strip, lines))
        if r["kind"] == "energy"
    }
    p = device_power(accelerator("h100-sxm"))
    assert p.idle_w == pytest.approx(records["idle"], abs=0.01)
    assert p.compute_w == pytest.approx(records["gemm8192_bf16"], abs=0.01)
    assert p.memory_w == pytest.approx(records["d2d_copy_2GiB"], abs=0.01)
    assert p.communicating_w == p.memory_w
    assert MEASUREMENT_FILE in p.source


def test_unmeasured_devices_use_h100_tdp_fractions() -> None:
    """A device without a power block draws the H100's measured fractions of its own TDP."""
    h100 = device_power(accelerator("h100-sxm"))
    a100 = accelerator("a100-80gb-sxm")
    p = device_power(a100)
    assert p.compute_w == pytest.approx(h100.compute_w / 700.0 * a100.tdp_w)
    assert p.memory_w == pytest.approx(h100.memory_w / 700.0 * a100.tdp_w)
    assert p.idle_w == a100.idle_w
    assert "assumed" in p.source


def test_every_preset_busy_power_is_at_least_idle() -> None:
    """For every accelerator preset, idle <= each busy state <= TDP."""
    for name in names("accelerators"):
        acc = accelerator(name)
        p = device_power(acc)
        for state in STATES:
            assert p.idle_w <= p.watts(state) <= acc.tdp_w, (name, state)


@settings(max_examples=60, deadline=None)
@given(
    spans=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from(["compute", "memory", "communicating"]),
            st.floats(0, 0.3),
        ),
        max_size=6,
    ),
    extra=st.tuples(
        st.integers(0, 2),
        st.sampled_from(["compute", "memory", "communicating"]),
        st.floats(0, 0.1),
    ),
)
def test_more_load_never_lowers_energy_for_the_same_duration(spans: list, extra: tuple) -> None:
    """Adding a busy span within the same duration never lowers the energy."""
    before = account_from_busy(POWER, 3, 2.0, spans).device_j
    after = account_from_busy(POWER, 3, 2.0, [*spans, extra]).device_j
    assert after >= before - 1e-9


def test_more_serving_load_never_lowers_energy() -> None:
    """The same serving window at higher arrival rates never costs less energy."""
    joules = [_run(_serving(rate)).summary["energy"]["energy_j"] for rate in (1.0, 8.0, 30.0)]
    assert joules[0] <= joules[1] <= joules[2], joules


# --- hosts, switches, links, measured communicating power (issue #5) -----------------

H200_POWER_FILE = "moesim/catalog/measurements/h200x2_power_2026-11-22.jsonl"
HOST_WITH_POWER: dict[str, Any] = {
    "dram_gib": 2048,
    "dram_bandwidth_gbps": 614.4,
    "nvme_tib": 0,
    "nvme_read_gbps": 0,
    "nvme_write_gbps": 0,
    "source": "test host",
    "power_idle_w": 150.0,
    "power_busy_w": 650.0,
    "power_source": "test figures",
}
FAT_TREE_LAYER: dict[str, Any] = {
    "name": "ft",
    "seed": 2,
    "cluster": {"preset": "h100-fat-tree", "nodes": 2},
    "model": "mixtral-8x22b",
    "routing": {"kind": "zipf", "s": 0.8, "permute": True},
    "parallelism": {"dp": 16, "ep": 8, "etp": 2},
    "policies": {"capacity_factor": 1.5, "overflow": "reroute", "priority": "probability"},
    "workload": {"kind": "layer", "tokens": 8192},
}


def _h200_records() -> dict[str, list[float]]:
    lines = (ROOT / H200_POWER_FILE).read_text("utf-8").splitlines()
    out: dict[str, list[float]] = {}
    for r in map(json.loads, filter(str.strip, lines)):
        if r["kind"] == "power":
            out.setdefault(r["label"], []).append(r["energy_w"])
    return out


def test_h200_powers_equal_the_measurement_records() -> None:
    """The H200's idle, compute, memory and communicating watts are the means of the
    jsonl's power records (2 GPUs x 2 runs each), communicating measured, not assumed."""
    rec = _h200_records()
    p = device_power(accelerator("h200-sxm"))
    mean = {k: sum(v) / len(v) for k, v in rec.items()}
    assert all(len(v) == 4 for v in rec.values()), {k: len(v) for k, v in rec.items()}
    assert p.idle_w == pytest.approx(mean["idle_ctx"], abs=0.01)
    assert p.compute_w == pytest.approx(mean["gemm_bf16"], abs=0.01)
    assert p.memory_w == pytest.approx(mean["d2d_copy"], abs=0.01)
    assert p.communicating_w == pytest.approx(mean["all_to_all"], abs=0.01)
    assert p.communicating_w != p.memory_w
    assert "communicating: measured" in p.source and H200_POWER_FILE in p.source
    # the measured ordering: idle < small a2a < all-reduce < a2a < copy < GEMM
    order = ["idle", "idle_ctx", "all_to_all_small", "all_reduce", "all_to_all", "d2d_copy"]
    assert [mean[k] for k in order] == sorted(mean[k] for k in order)
    assert mean["d2d_copy"] < mean["gemm_bf16"]


def test_two_device_layer_energy_is_the_integral_over_every_device_timeline() -> None:
    """Two H200s: J = sum over each device's compute intervals of duration x state power,
    plus the measured communicating power over its all-to-all windows (gate end -> all its
    tokens in; experts end -> its output back), plus idle power over the rest of each
    device's time (devices x layer time)."""
    result = _run({**ONE_GPU_LAYER, "cluster": "h200x2", "parallelism": {"dp": 2, "ep": 2}})
    rec = result.records
    assert isinstance(rec, LayerRecords)
    p = device_power(accelerator("h200-sxm"))
    devices = 2
    tl = rec.timeline
    busy = sum(iv.end_s - iv.start_s for iv in tl.intervals)
    comm = 0.0
    for d in range(devices):
        spans = [(iv.start_s, iv.end_s) for iv in tl.intervals if iv.device == d]
        for a, b in ((tl.gate_end_s[d], tl.ready_s[d]), (tl.expert_end_s[d], tl.rank_done_s[d])):
            inside = sum(max(0.0, min(b, e) - max(a, st)) for st, e in spans)
            comm += max(0.0, b - a - inside)
    assert comm > 0  # two GPUs exchange tokens over NVLink
    expected = (
        sum(
            (iv.end_s - iv.start_s) * (p.compute_w if iv.name == "experts" else p.memory_w)
            for iv in tl.intervals
        )
        + p.communicating_w * comm
        + p.idle_w * (devices * rec.time_s - busy - comm)
    )
    energy = result.summary["energy"]
    assert {iv.device for iv in tl.intervals} == {0, 1}
    assert energy["energy_j_by_component"]["devices"] == pytest.approx(expected, rel=1e-8)
    host_w = result.system.topology.host_spec.power_busy_w  # 2 of a DGX host's 8 GPU shares
    assert host_w == 175.0
    assert energy["energy_j"] == pytest.approx(expected + host_w * rec.time_s, rel=1e-8)
    seconds = energy["device_seconds_by_state"]
    assert sum(seconds.values()) == pytest.approx(devices * rec.time_s, rel=1e-8)
    assert seconds["communicating"] == pytest.approx(comm, rel=1e-8)
    comp = energy["energy_j_by_component"]
    assert comp["hosts"] == pytest.approx(175.0 * rec.time_s, rel=1e-8)
    assert comp["switches"] == 0 and comp["network_links"] == 0


def test_serving_energy_is_the_integral_over_the_iterations() -> None:
    """Serving: busy device-seconds = devices x the sum of iteration times (the MoE
    all-to-all part communicating), the rest of the window idle, and each state's joules =
    its device-seconds x its watts."""
    result = _run(_serving(rate=8.0, duration_s=2.0))
    energy = result.summary["energy"]
    it = result.records.iterations
    busy = float(it.duration_s.sum())
    seconds = energy["device_seconds_by_state"]
    window = energy["duration_s"]
    assert busy > 0
    assert window >= 2.0
    comm = float(np.minimum(it.moe_comm_s, it.moe_s).sum())
    assert seconds["communicating"] == pytest.approx(comm, rel=1e-8)
    assert seconds["compute"] + seconds["memory"] + comm == pytest.approx(busy, rel=1e-8)
    assert seconds["idle"] == pytest.approx(window - busy, rel=1e-8)
    w = energy["power_w"]
    for state in STATES:
        assert energy["energy_j_by_state"][state] == pytest.approx(
            seconds[state] * w[state], rel=1e-8
        )
    comp = energy["energy_j_by_component"]
    assert comp["devices"] == pytest.approx(sum(energy["energy_j_by_state"].values()))
    assert energy["energy_j"] == pytest.approx(sum(comp.values()))
    # energy covers the whole run, and so do its counts (named apart from the top-level,
    # measured-request counts): every request of 8 output tokens finished
    r = result.records.requests
    assert "completed_requests" not in energy and "output_tokens" not in energy
    assert energy["run_completed_requests"] == len(r.arrival_s) > 0
    assert energy["run_output_tokens"] == 8 * len(r.arrival_s)
    assert energy["energy_per_token_j"] == pytest.approx(
        energy["energy_j"] / energy["run_output_tokens"], rel=1e-8
    )
    assert energy["energy_per_request_j"] == pytest.approx(
        energy["energy_j"] / energy["run_completed_requests"], rel=1e-8
    )


def test_zero_load_serving_costs_device_and_host_idle_power_only() -> None:
    """No arrival in the window: devices at idle power and hosts at their idle power, the
    busy host power never drawn (a host with idle 150 W and busy 650 W)."""
    scen = _serving(rate=1e-9, duration_s=2.0)
    scen["cluster"] = {"preset": "single-h100", "host": HOST_WITH_POWER}
    energy = _run(scen).summary["energy"]
    idle_w = device_power(accelerator("h100-sxm")).idle_w
    comp = energy["energy_j_by_component"]
    assert comp["devices"] == pytest.approx(idle_w * 2.0, rel=1e-8)
    assert comp["hosts"] == pytest.approx(150.0 * 2.0, rel=1e-8)
    assert energy["energy_j"] == pytest.approx((idle_w + 150.0) * 2.0, rel=1e-8)


def test_host_energy_is_power_times_duration_by_busy_share() -> None:
    """Hosts draw idle + busy share x (busy - idle) for the whole duration."""
    infra = Infrastructure(hosts=2, host_idle_w=100.0, host_busy_w=300.0, switch_w=40.0)
    spans: list[tuple[int, State, float]] = [(0, "compute", 1.0), (1, "memory", 0.5)]
    account = account_from_busy(POWER, devices=4, duration_s=2.0, busy=spans, infra=infra)
    share = 1.5 / (4 * 2.0)
    assert account.busy_share == pytest.approx(share)
    assert account.host_j == pytest.approx(2 * (100.0 + share * 200.0) * 2.0, rel=1e-12)
    assert account.switch_j == pytest.approx(40.0 * 2.0, rel=1e-12)
    assert account.it_j == pytest.approx(
        account.device_j + account.host_j + account.switch_j, rel=1e-12
    )
    idle = account_from_busy(POWER, devices=4, duration_s=2.0, busy=[], infra=infra)
    assert idle.host_j == pytest.approx(2 * 100.0 * 2.0, rel=1e-12)
    scaled = account.scaled(3.0)
    assert scaled.host_j == pytest.approx(3 * account.host_j)
    assert scaled.switch_j == pytest.approx(3 * account.switch_j)


def test_dgx_host_power_is_charged_over_the_layer_time() -> None:
    """dgx-h100: one host with 2 x 350 W CPU sockets and no idle figure draws 700 W for
    the whole layer time; the summary's components add up to the total."""
    result = _run({**ONE_GPU_LAYER, "cluster": "dgx-h100", "parallelism": {"dp": 8, "ep": 8}})
    energy = result.summary["energy"]
    rec = result.records
    assert isinstance(rec, LayerRecords)
    comp = energy["energy_j_by_component"]
    assert comp["hosts"] == pytest.approx(700.0 * 1 * rec.time_s, rel=1e-8)
    assert sum(comp.values()) == pytest.approx(energy["energy_j"], rel=1e-8)
    assert any(n.startswith("hosts: 1 x") for n in energy["notes"])
    assert any("nvswitch-gen3 has no published power_w" in n for n in energy["notes"])


def test_network_energy_is_bytes_times_8_times_pj_per_bit() -> None:
    """One ib-ndr edge carrying B bytes costs B x 8 x 20 pJ; an NVLink edge (no published
    figure) costs nothing and is reported as uncovered."""
    result = _run(FAT_TREE_LAYER)
    system = result.system
    g = system.topology.graph
    edges = list(system.paths.edges)
    ib = next(i for i, (u, v) in enumerate(edges) if g[u][v].get("link") == "ib-ndr")
    nv = next(i for i, (u, v) in enumerate(edges) if g[u][v].get("link") == "nvlink4")
    nbytes = np.zeros(len(edges))
    nbytes[ib] = 3.0e9
    joules, note = network_energy_j(system, nbytes)
    assert joules == pytest.approx(3.0e9 * 8 * 20.0e-12, rel=1e-12)
    assert "0 J" not in note
    nbytes[nv] = 1.0e9
    joules2, note2 = network_energy_j(system, nbytes)
    assert joules2 == joules
    assert "1e+09 bytes" in note2
    # the run itself: its link energy is its ib-ndr bytes x 8 x 20 pJ
    rec = result.records
    assert isinstance(rec, LayerRecords)
    ib_bytes = sum(
        float(rec.link_bytes[i])
        for i, (u, v) in enumerate(edges)
        if g[u][v].get("link") == "ib-ndr"
    )
    assert ib_bytes > 0
    links_j = result.summary["energy"]["energy_j_by_component"]["network_links"]
    assert links_j == pytest.approx(ib_bytes * 8 * 20.0e-12, rel=1e-8)


def test_switch_power_is_charged_pro_rata_of_attached_ports() -> None:
    """A switch spec with power_w charges power_w / ports per attached port: dgx-h100
    attaches 8 GPUs x 18 NVLink ports to the nvswitch-gen3 switch (64 ports)."""
    cluster = {"preset": "dgx-h100", "switches": {"nvswitch-gen3": {"power_w": 128.0}}}
    result = _run({**ONE_GPU_LAYER, "cluster": cluster, "parallelism": {"dp": 8, "ep": 8}})
    system = result.system
    assert switch_ports(system) == {"nvswitch-gen3": 8 * 18}
    infra = infrastructure(system)
    assert infra.switch_w == pytest.approx(128.0 / 64 * 144)
    assert infra.hosts == 1 and infra.host_idle_w == infra.host_busy_w == 700.0


def test_fabric_switch_ports_count_nics_and_both_uplink_ends() -> None:
    """h100-rail, 4 nodes x 8 NICs: 8 rail leaves of 4 NIC ports each (32), joined by a
    spine with one uplink per NIC port (oversubscription 1), each uplink using a port at
    both ends (2 x 8 x 4); the NVSwitch ports are 32 GPUs x 18."""
    scen = {**FAT_TREE_LAYER, "cluster": {"preset": "h100-rail", "nodes": 4}}
    scen["parallelism"] = {"dp": 32, "ep": 8, "etp": 4}
    system = _build(scen)
    ports = switch_ports(system)
    assert ports["nvswitch-gen3"] == 32 * 18
    assert ports["ib-quantum2-ndr"] == 32 + 2 * 8 * 4


def _build(scen: dict[str, Any]) -> Any:
    from moesim.system import build_system

    return build_system(scenario_from_dict(scen))


def test_host_power_needs_a_citation_and_idle_below_busy() -> None:
    """HostSpec refuses an uncited host power and an idle figure above the busy one."""
    from pydantic import ValidationError

    from moesim.config.cluster import HostSpec

    base = {k: v for k, v in HOST_WITH_POWER.items() if not k.startswith("power")}
    HostSpec.model_validate(base)  # no power: fine (left out of the energy)
    with pytest.raises(ValidationError, match="power_source"):
        HostSpec.model_validate({**base, "power_busy_w": 100.0})
    with pytest.raises(ValidationError, match="must not exceed"):
        HostSpec.model_validate(
            {**base, "power_busy_w": 100.0, "power_idle_w": 200.0, "power_source": "x"}
        )


def test_pue_and_carbon_cover_hosts_and_links() -> None:
    """Facility J = (devices + hosts + links + switches) x PUE; kgCO2e = kWh x g/kWh / 1000."""
    energy = _run(
        FAT_TREE_LAYER, energy={"pue": 1.25, "carbon_intensity_g_per_kwh": 400.0}
    ).summary["energy"]
    comp = energy["energy_j_by_component"]
    it_j = comp["devices"] + comp["hosts"] + comp["network_links"] + comp["switches"]
    assert comp["hosts"] > 0 and comp["network_links"] > 0
    assert energy["energy_j"] == pytest.approx(1.25 * it_j, rel=1e-8)
    assert comp["facility_overhead"] == pytest.approx(0.25 * it_j, rel=1e-8)
    assert energy["kgco2e"] == pytest.approx(1.25 * it_j / 3.6e6 * 400.0 / 1000.0, rel=1e-8)


def test_power_sampler_window_and_records() -> None:
    """torch_power (no torch needed for this part): a window's statistics come from the
    samples inside it, its energy from the counter's first and last reading there, and
    each phase yields one record per GPU it ran on, with its device state."""
    from moesim.calibrate.torch_power import Sampler, summarize

    s = Sampler([0, 1], 0.1, fake=True)
    s.samples = [
        (float(t), g, 100.0 + 10 * g + t, 1000.0 * t + g, 1500.0, 40.0 + t)
        for t in range(10)
        for g in (0, 1)
    ]
    w = s.window(1, 2.0, 6.0)
    assert w["samples"] == 5
    assert w["mean_w"] == pytest.approx(110.0 + 4.0)
    assert w["median_w"] == pytest.approx(114.0)
    assert w["energy_j"] == pytest.approx(4000.0)
    assert w["energy_w"] == pytest.approx(1000.0)
    assert w["temp_c_max"] == 46.0
    windows = [
        {"phase": "idle", "rank": None, "t0": 2.0, "t1": 6.0},
        {"phase": "all_to_all", "rank": 1, "t0": 0.0, "t1": 9.0, "algbw_gbps": 5.0},
    ]
    recs = summarize(s, windows, [0, 1], {"name": "X", "driver": "d"})
    assert [(r["label"], r["gpu"], r["state"]) for r in recs] == [
        ("idle", 0, "idle"),
        ("idle", 1, "idle"),
        ("all_to_all", 1, "communicating"),
    ]
    assert recs[2]["samples"] == 10 and recs[2]["algbw_gbps"] == 5.0


def test_training_step_charges_the_measured_communicating_power() -> None:
    """A training step on two H200s: its communicating device-seconds (all-to-all, gradient
    sync) draw the measured 353.24 W, not the memory-bound 561.44 W, and the run's energy
    is the step's times the steps."""
    scen = {
        "name": "tr",
        "seed": 3,
        "cluster": "h200x2",
        "model": "olmoe-1b-7b",
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": 2, "ep": 2},
        "policies": {"capacity_factor": None, "overflow": "dropless"},
        "workload": {"kind": "training", "seq_len": 2048, "microbatches": 2, "steps": 3},
    }
    energy = _run(scen).summary["energy"]
    seconds = energy["device_seconds_by_state"]
    assert seconds["communicating"] > 0
    assert energy["power_w"]["communicating"] == 353.24
    assert energy["energy_j_by_state"]["communicating"] == pytest.approx(
        seconds["communicating"] * 353.24, rel=1e-8
    )
    assert energy["energy_j"] == pytest.approx(3 * energy["energy_per_step_j"], rel=1e-8)


def test_training_run_energy_covers_its_wall_clock() -> None:
    """A training run over ``duration_s``: computed steps at one step's energy, every other
    second (checkpoint writes, restarts) with devices and hosts idle; closed form."""
    from moesim.energy.account import infrastructure
    from moesim.energy.workload_accounts import training_account

    scenario = moesim.load_scenario(
        "scenarios/training-checkpoint-restart-h100.yaml",
        [
            "workload.duration_s=3600",
            "workload.seq_len=256",
            "workload.microbatches=4",
            "failures.devices=[{kind: scheduled, device: 3, at_s: 1000}]",
            "failures.links=[]",
            "failures.stragglers=[]",
            "energy.pue=1.1",
        ],
    )
    result = moesim.run(scenario)
    run, e = result.training_run, result.summary["energy"]
    assert run is not None and run.lost_steps >= 0 and run.interruptions == 1
    w = scenario.workload
    step = training_account(result.system, w, result.records)  # type: ignore[arg-type]
    infra = infrastructure(result.system)
    waiting = run.duration_s - run.computed_steps * run.step_s
    assert waiting > run.down_s + run.restart_s > 0
    idle_w = step.devices * step.power.watts("idle") + infra.host_w(0.0) + infra.switch_w
    expected = (step.it_j * run.computed_steps + waiting * idle_w) * 1.1
    assert e["energy_j"] == pytest.approx(expected, rel=1e-6)
    assert e["duration_s"] == pytest.approx(run.duration_s)
    assert e["steps"] == run.computed_steps and e["useful_steps"] == run.useful_steps
    assert e["energy_per_useful_step_j"] == pytest.approx(
        e["energy_j"] / run.useful_steps, rel=1e-6
    )
    # losing work costs energy: per useful step it is dearer than one step
    assert e["energy_per_useful_step_j"] > e["energy_per_step_j"]


def _ib_joules(result: Any, link_bytes: np.ndarray) -> float:
    """Closed form: bytes on InfiniBand NDR edges x 8 x the preset's 20 pJ/bit."""
    g = result.system.topology.graph
    pj = {"ib-ndr": 20.0}
    total = 0.0
    for i, (u, v) in enumerate(result.system.paths.edges):
        total += float(link_bytes[i]) * 8 * pj.get(g[u][v].get("link"), 0.0) * 1e-12
    return total


CROSS_NODE = {
    "name": "cross-node",
    "seed": 2,
    "cluster": {"preset": "h100-fat-tree", "nodes": 2},
    "model": {"preset": "mixtral-8x7b", "experts": 16, "layers": 2},
    "parallelism": {"dp": 16, "ep": 16},
    "policies": {"capacity_factor": None, "overflow": "dropless"},
}


def test_serving_link_energy_is_the_all_to_all_bytes_times_pj_per_bit() -> None:
    s = scenario_from_dict(
        {
            **CROSS_NODE,
            "workload": {
                "kind": "serving",
                "duration_s": 2,
                "warmup_s": 0.5,
                "arrival": {"kind": "poisson", "rate_per_s": 20},
                "prompt_tokens": {"kind": "constant", "value": 128},
                "output_tokens": {"kind": "constant", "value": 8},
            },
        }
    )
    result = moesim.run(s)
    rec = result.records
    assert rec.moe_link_bytes is not None
    expected = _ib_joules(result, rec.moe_link_bytes)
    assert expected > 0
    assert result.summary["energy"]["energy_j_by_component"]["network_links"] == pytest.approx(
        expected, rel=1e-6
    )
    # every iteration's MoE layers: the total is the sum over iterations of the memoized
    # per-layer bytes, x 2 MoE layers
    one = moesim.run(s).records.moe_link_bytes
    assert np.array_equal(one, rec.moe_link_bytes)


def test_training_link_energy_is_the_all_to_all_bytes_times_pj_per_bit() -> None:
    s = scenario_from_dict(
        {
            **CROSS_NODE,
            "workload": {
                "kind": "training",
                "seq_len": 256,
                "micro_batch_sequences": 1,
                "microbatches": 2,
            },
        }
    )
    result = moesim.run(s)
    rec = result.records
    assert rec.moe_link_bytes is not None
    e = result.summary["energy"]
    expected = _ib_joules(result, rec.moe_link_bytes)
    assert expected > 0
    assert e["energy_j_by_component"]["network_links"] == pytest.approx(expected, rel=1e-6)
    # per step: layers x (forward + backward) x micro-batches x one layer's bytes
    from moesim.engine.layer_sim import simulated_layer_cost

    one_layer = simulated_layer_cost(result.system).link_bytes(256 * 16)
    assert np.allclose(rec.moe_link_bytes, one_layer * 2 * 2 * 2)


def test_steady_state_energy_per_token_covers_the_steady_window() -> None:
    """Serving energy per output token over the steady-state window sits beside the
    whole-run figure: same window as the summary's steady_state, its tokens are the ones
    generated there, and the whole run (warm-up ramp and drain's idle tail) costs more per
    token; the printed energy line labels both."""
    from moesim.energy.summary import energy_lines

    s = moesim.run(
        moesim.load_scenario(
            Path(__file__).parent.parent / "scenarios" / "mixtral-serving-dgx-h100.yaml",
            ["model.layers=4", "workload.duration_s=6", "workload.warmup_s=1"],
        )
    ).summary
    e, steady = s["energy"], s["steady_state"]
    assert e["steady_window_s"] == [steady["start_s"], steady["end_s"]]
    length = steady["end_s"] - steady["start_s"]
    assert e["steady_output_tokens"] == pytest.approx(steady["throughput_tokens_per_s"] * length)
    assert 0 < e["steady_energy_per_token_j"] < e["energy_per_token_j"]
    line = energy_lines(s).splitlines()[0]
    assert "(whole run)" in line and "(steady state," in line
