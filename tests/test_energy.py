"""Energy and carbon: the power model, the accountant and the summary section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim
from moesim.catalog import names
from moesim.catalog.hardware import accelerator
from moesim.config.energy import EnergyConfig
from moesim.energy.account import account_from_busy, facility
from moesim.energy.power import MEASUREMENT_FILE, STATES, DevicePower, device_power
from moesim.engine.layer_workload import LayerRecords
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
    assert energy["energy_j"] == pytest.approx(expected, rel=1e-8)
    assert energy["average_power_w"] == pytest.approx(expected / rec.time_s, rel=1e-8)
    assert energy["energy_per_token_j"] == pytest.approx(expected / 16384, rel=1e-8)


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
    assert energy["energy_j"] == pytest.approx(idle_w * 1 * 2.0, rel=1e-8)
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
