"""The hardware presets (accelerators, links, switches) validate and carry their sources."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from moesim.catalog import names, raw_preset
from moesim.catalog.hardware import accelerator, link, switch
from moesim.config.hardware import (
    AcceleratorSpec,
    Efficiency,
    LinkSpec,
    PeakTflops,
    SwitchSpec,
    source_keys_valid,
)

H100_FILE = "moesim/catalog/measurements/h100_sxm_primitives.jsonl"

REQUIRED_ACCELERATORS = {
    "h100-sxm",
    "h200-sxm",
    "h800-sxm",
    "a100-80gb-sxm",
    "b200",
    "mi300x",
    "rtx-a5000",
    "tpu-v3",
    "tpu-v4",
    "tpu-v5p",
}
REQUIRED_LINKS = {
    "nvlink3",
    "nvlink4",
    "nvlink5",
    "nvlink-bridge-a5000",
    "pcie-gen4-x16",
    "pcie-gen5-x16",
    "ib-hdr",
    "ib-ndr",
    "roce-200g",
    "roce-400g",
    "ici-v3",
    "ici-v4",
    "ici-v5p",
    "infinity-fabric-mi300x",
}
REQUIRED_SWITCHES = {
    "nvswitch-gen2",
    "nvswitch-gen3",
    "nvswitch-gen4",
    "ib-quantum-hdr",
    "ib-quantum2-ndr",
    "ethernet-spectrum4",
    "pcie-gen5-switch",
}


def _h100_records() -> list[dict[str, Any]]:
    path = resources.files("moesim.catalog") / "measurements" / Path(H100_FILE).name
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _all_specs() -> list[AcceleratorSpec | LinkSpec | SwitchSpec]:
    return (
        [accelerator(n) for n in names("accelerators")]
        + [link(n) for n in names("links")]
        + [switch(n) for n in names("switches")]
    )


def test_required_presets_exist() -> None:
    """Every preset name the catalog promises is present in its data file."""
    assert set(names("accelerators")) >= REQUIRED_ACCELERATORS
    assert set(names("links")) >= REQUIRED_LINKS
    assert set(names("switches")) >= REQUIRED_SWITCHES


def test_every_preset_validates_and_is_named_by_its_key() -> None:
    """Each preset of the three files builds its typed spec, named after its key."""
    for kind, build in (("accelerators", accelerator), ("links", link), ("switches", switch)):
        for name in names(kind):  # type: ignore[arg-type]
            spec = build(name)
            assert spec.name == name


def test_every_preset_has_a_source() -> None:
    """Every preset names a non-blank source, and so does every accelerator's efficiency."""
    for spec in _all_specs():
        assert spec.source.strip(), spec.name
        assert all(v.strip() for v in spec.sources.values()), spec.name
        if isinstance(spec, AcceleratorSpec):
            assert spec.efficiency.source.strip(), spec.name


def test_every_sources_key_names_a_field() -> None:
    """Each key of every preset's ``sources`` names a field of that preset's schema."""
    for spec in _all_specs():
        assert spec.sources, f"{spec.name} has no per-field sources"
        assert source_keys_valid(type(spec), spec.sources), spec.name
        for key in spec.sources:
            assert key.split(".")[0] in type(spec).model_fields, (spec.name, key)


def test_sources_key_that_is_not_a_field_is_rejected() -> None:
    """A ``sources`` key that names no field makes the preset invalid."""
    data = raw_preset("links", "ib-ndr")
    data["sources"] = {**data.get("sources", {}), "bandwith_gbps": "typo"}
    with pytest.raises(ValidationError, match="bandwith_gbps"):
        LinkSpec.model_validate(data)


def test_port_and_host_links_name_existing_link_presets() -> None:
    """Every ``ports[].link`` and ``host_link`` of an accelerator is a link preset."""
    links = set(names("links"))
    for name in names("accelerators"):
        spec = accelerator(name)
        assert spec.ports or spec.kind == "cpu", f"{name} has no scale-up ports"
        for port in spec.ports:
            assert port.link in links, (name, port.link)
        assert spec.host_link is None or spec.host_link in links, (name, spec.host_link)


def test_idle_power_is_below_tdp() -> None:
    """Every accelerator idles below its TDP, and the schema refuses the opposite."""
    for name in names("accelerators"):
        spec = accelerator(name)
        assert 0 <= spec.idle_w < spec.tdp_w, name
    data = raw_preset("accelerators", "h100-sxm")
    data.pop("profile", None)  # a catalog profile name; the spec takes the profile data
    data["idle_w"] = data["tdp_w"]
    with pytest.raises(ValidationError, match="idle_w"):
        AcceleratorSpec.model_validate(data)


def test_measured_link_values_need_a_citation() -> None:
    """A link's effective bandwidth or energy is refused without a sources entry."""
    data = raw_preset("links", "ib-hdr")
    data["effective_bandwidth_gbps"] = 20.0
    data["sources"] = {
        k: v for k, v in data.get("sources", {}).items() if k != "effective_bandwidth_gbps"
    }
    with pytest.raises(ValidationError, match="effective_bandwidth_gbps"):
        LinkSpec.model_validate(data)


def test_efficiency_bounds_are_enforced() -> None:
    """Efficiency fractions must lie in (0, 1]."""
    with pytest.raises(ValidationError):
        Efficiency(compute=1.2, memory=0.5, source="x")
    with pytest.raises(ValidationError):
        Efficiency(compute=0.5, memory=0.0, source="x")


def test_unknown_preset_raises_keyerror_listing_valid_names() -> None:
    """Asking for a missing preset raises KeyError whose message lists the valid names."""
    with pytest.raises(KeyError, match="h100-sxm"):
        accelerator("h1000")
    with pytest.raises(KeyError, match="nvlink4"):
        link("nvlink9")
    with pytest.raises(KeyError, match="nvswitch-gen3"):
        switch("nvswitch-gen9")


def test_peak_for_dtype() -> None:
    """``for_dtype`` returns the peak and raises ValueError for unsupported or unknown types."""
    peak = accelerator("a100-80gb-sxm").peak_tflops
    assert peak.for_dtype("bf16") == 312.0
    with pytest.raises(ValueError, match="fp8"):
        peak.for_dtype("fp8")
    with pytest.raises(ValueError, match="fp4"):
        PeakTflops(bf16=1.0, fp16=1.0, fp32=1.0).for_dtype("fp4")


def test_datasheet_spot_checks() -> None:
    """Key datasheet figures match their published values."""
    h100 = accelerator("h100-sxm")
    assert h100.peak_tflops.bf16 == pytest.approx(989.4, rel=0.01)
    assert h100.memory_bandwidth_gbps == pytest.approx(3350.0)
    assert h100.tdp_w == 700.0
    assert sum(p.count for p in h100.ports if p.link == "nvlink4") == 18
    assert accelerator("h200-sxm").memory_bandwidth_gbps == pytest.approx(4800.0)
    assert sum(p.count for p in accelerator("h800-sxm").ports) == 8
    assert accelerator("mi300x").peak_tflops.bf16 == pytest.approx(1307.4, rel=0.01)
    assert accelerator("tpu-v5p").memory_bandwidth_gbps == pytest.approx(2765.0)
    assert link("ib-ndr").bandwidth_gbps == pytest.approx(50.0)
    assert link("ib-hdr").bandwidth_gbps == pytest.approx(25.0)
    # 18 NVLink4 links x 25 GB/s x 2 directions = the marketed 900 GB/s.
    assert 18 * link("nvlink4").bandwidth_gbps * 2 == pytest.approx(900.0)
    assert switch("ib-quantum2-ndr").ports == 64


def test_h100_values_follow_the_measurement_file() -> None:
    """H100 idle power, efficiencies and launch overhead equal the jsonl measurements."""
    records = _h100_records()
    h100 = accelerator("h100-sxm")
    idle = next(r for r in records if r["kind"] == "energy" and r["label"] == "idle")
    assert h100.idle_w == pytest.approx(idle["watts"], abs=0.1)
    best_gemm = max(r["tflops"] for r in records if r["kind"] == "gemm" and r["dtype"] == "bf16")
    assert h100.efficiency.compute == pytest.approx(best_gemm / h100.peak_tflops.bf16, abs=1e-3)
    d2d = max(r["gbps_rw"] for r in records if r["kind"] == "d2d")
    assert h100.efficiency.memory == pytest.approx(d2d / h100.memory_bandwidth_gbps, abs=1e-3)
    launch = next(r for r in records if r["kind"] == "launch")
    assert h100.kernel_overhead_us == pytest.approx(launch["us_per_kernel"], abs=0.01)
    env = next(r for r in records if r["kind"] == "env")
    assert h100.usable_memory_gib == pytest.approx(env["mem"] / 2**30, abs=0.01)
    assert H100_FILE in h100.efficiency.source
    for field in ("idle_w", "kernel_overhead_us"):
        assert H100_FILE in h100.sources[field]


def test_pcie_gen5_effective_bandwidth_follows_measurement() -> None:
    """PCIe Gen5 effective bandwidth equals the best pinned host-to-device copy measured."""
    records = _h100_records()
    best = max(r["gbps"] for r in records if r["kind"] == "h2d" and r["mem"] == "pinned")
    effective = link("pcie-gen5-x16").effective_bandwidth_gbps
    assert effective is not None
    assert effective == pytest.approx(best, rel=0.01)
    assert effective < link("pcie-gen5-x16").bandwidth_gbps


def test_specs_are_frozen() -> None:
    """Loaded presets cannot be mutated."""
    with pytest.raises(ValidationError):
        accelerator("h100-sxm").tdp_w = 1.0  # type: ignore[misc]
