"""Validation of the offload model against a held-out measurement on an H200 host.

Source: moesim/catalog/measurements/h200_offload_2026-11-22.jsonl, measured by
``python3 -m moesim.calibrate.torch_offload`` on one H200 SXM (PCIe Gen5 x16 host link):
host-to-device copies of one Mixtral-8x7B expert (352 MB), one expert's forward, and a
decode MoE layer of 8 experts with 0-8 of them copied in from pinned host memory while the
resident ones compute (the ``overlap`` rule of :mod:`moesim.cost.offload`). The catalog's
pinned rate (55 GB/s) was measured on a different machine (an H100 host), so this is a
held-out check; docs/fidelity.md tabulates it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim.cost.offload import tier_rates
from moesim.derived.model_figures import figures
from moesim.loader import scenario_from_dict
from moesim.system import build_system

FILE = Path(__file__).parent.parent / "moesim/catalog/measurements/h200_offload_2026-11-22.jsonl"


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    return [json.loads(line) for line in FILE.read_text().splitlines()]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    s = scenario_from_dict(
        {
            "name": "offload-validation",
            "cluster": "single-h200",
            "model": "mixtral-8x7b",
            "workload": {"kind": "layer", "tokens": 8},
        }
    )
    return s, build_system(s)


def _copy_s(s, mem: str) -> float:  # type: ignore[no-untyped-def]
    r = tier_rates(s, mem)
    return r.latency_s + 2 * figures(s.model).expert_params / r.dram_bps


def test_measured_expert_is_the_model_expert(measured: list[dict], model) -> None:  # type: ignore[no-untyped-def]
    s, _ = model
    assert measured[0]["expert_bytes"] == 2 * figures(s.model).expert_params


def test_pinned_copy_of_one_expert_within_2_percent(measured: list[dict], model) -> None:  # type: ignore[no-untyped-def]
    s, _ = model
    (rec,) = [r for r in measured if r["kind"] == "copy" and r["mem"] == "pinned"]
    assert _copy_s(s, "pinned") * 1e3 == pytest.approx(rec["median_ms"], rel=0.02)


def test_layer_with_misses_follows_the_overlap_rule(measured: list[dict], model) -> None:  # type: ignore[no-untyped-def]
    """Resident experts compute while misses copy one after another; each miss computes
    when it lands. Copy-bound layers (>= 1 miss) within 5%; all-resident layers within
    25% (the decode-size expert GEMM, the profile's known small-batch error)."""
    s, system = model
    rf = system.layer_costs.roofline
    copy = _copy_s(s, "pinned")
    layers = [r for r in measured if r["kind"] == "layer"]
    assert len(layers) >= 8
    for r in layers:
        expert = rf.dense_ffn_s(r["tokens"], s.model.d_model, s.model.expert_d_ff, "swiglu")
        t = expert * (r["experts"] - r["misses"])
        for i in range(r["misses"]):
            t = max(t, (i + 1) * copy) + expert
        error = t * 1e3 / r["median_ms"] - 1
        assert abs(error) <= (0.05 if r["misses"] else 0.25), (r["tokens"], r["misses"], error)


def test_pageable_copies_are_host_dependent(measured: list[dict], model) -> None:  # type: ignore[no-untyped-def]
    """The pageable ratio comes from the H100 host (19 GB/s); this H200 host managed
    ~8 GB/s: the model is optimistic there by ~2.3x (documented in docs/fidelity.md).
    The test pins the documented figure so a change in either shows up."""
    s, _ = model
    (rec,) = [r for r in measured if r["kind"] == "copy" and r["mem"] == "pageable"]
    ratio = rec["median_ms"] / (_copy_s(s, "pageable") * 1e3)
    assert 2.0 < ratio < 2.7
