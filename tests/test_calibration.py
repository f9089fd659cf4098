"""Calibration: fitting recovers known parameters, and the numpy calibrate -> profile ->
simulate -> compare loop holds an error bound on held-out layer shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from moesim.calibrate import fidelity
from moesim.calibrate.commands import fit_from_records
from moesim.calibrate.fit import collectives, fit_gemm, profile_yaml
from moesim.calibrate.numpy_bench import SIZES, measure_env, measure_host, measure_layers
from moesim.calibrate.records import Writer
from moesim.config.profile import DeviceProfile
from moesim.cost.compute import Roofline


def _synthetic_gemms(flops: float, bw: float, overhead_us: float, p: float, tile: int) -> list:
    rf = Roofline(
        flops_per_s=flops,
        bytes_per_s=bw,
        overhead_s=0.0,
        bytes_per_element=2,
        memory_bytes_per_s=bw,
        smoothness=p,
        gemm_overhead_s=overhead_us * 1e-6,
        m_tile=tile,
    )
    recs = []
    for k, n in ((4096, 14336), (14336, 4096), (2048, 1024), (7168, 2048)):
        for m in (1, 4, 16, 64, 256, 1024, 4096, 16384):
            recs.append(
                {
                    "kind": "gemm",
                    "M": m,
                    "K": k,
                    "N": n,
                    "dtype": "bf16",
                    "ms": float(rf.gemm_s(m, k, n)) * 1e3,
                }
            )
    return recs


def test_gemm_fit_recovers_known_parameters() -> None:
    """Records generated from a known GEMM model are fitted back to that model."""
    recs = _synthetic_gemms(780e12, 2.1e12, 6.0, 2.0, 64)
    fit, q = fit_gemm(recs)
    assert fit.flops_per_s == pytest.approx(780e12, rel=0.02)
    assert fit.bytes_per_s == pytest.approx(2.1e12, rel=0.02)
    assert fit.overhead_us == pytest.approx(6.0, rel=0.05)
    assert fit.m_tile == 64
    assert q.median_abs_error < 0.01


def test_collective_alpha_beta_fit() -> None:
    """t = alpha + bytes / bandwidth is recovered from exact points."""
    recs = [
        {"kind": "all_to_all", "world": 2, "bytes_per_rank": b, "ms": (65e-6 + b / 310e9) * 1e3}
        for b in (4096, 1 << 20, 1 << 24, 1 << 28, 1 << 30)
    ]
    (fit,) = collectives(recs)
    assert fit.alpha_us == pytest.approx(65.0, rel=0.01)
    assert fit.bandwidth_gbps == pytest.approx(310.0, rel=0.01)


def test_shipped_h100_measurements_fit_well() -> None:
    """The team's H100 GEMM measurements fit the GEMM model within 15% (median)."""
    from importlib import resources

    from moesim.calibrate.records import read

    path = resources.files("moesim.catalog") / "measurements" / "h100_sxm_primitives.jsonl"
    _, q = fit_gemm(read(str(path)))
    assert q.samples > 50 and q.median_abs_error < 0.15


TINY = dataclasses.replace(
    SIZES["ci"],
    scale=32,
    gemm_m=(1, 8, 64, 512),
    tokens=(1, 32, 256),
    max_gflop=0.5,
    heldout_models=("mixtral-8x7b", "qwen1.5-moe-a2.7b"),
    min_time_s=0.03,
)


@pytest.fixture(scope="module")
def loop_result() -> tuple[DeviceProfile, list[fidelity.Row]]:
    w = Writer(None)
    measure_host(w, TINY, seed=1)
    profile = fit_from_records(w.records, "test measurements", TINY.fit_models)
    held = Writer(None)
    measure_env(held)
    measure_layers(held, TINY, TINY.heldout_models, 1, lambda s: None)
    rows = fidelity.compare(
        held.records,
        profile,
        backend="numpy",
        cluster="single-host-cpu",
        exclude_models=TINY.fit_models,
    )
    return profile, rows


def test_numpy_loop_predicts_held_out_layers(loop_result) -> None:
    """calibrate -> profile -> simulate -> compare on held-out shapes stays within the bound.

    The bound (median |error| <= 35%) is looser than the issue's 15% target for full runs:
    this tiny CI size on a shared 2-vCPU machine has timing noise of that order.
    """
    _profile, rows = loop_result
    assert len(rows) == 2 * len(TINY.tokens) * len(TINY.heldout_models)
    assert {r.model for r in rows} == set(TINY.heldout_models)  # the fit model is held out
    s = fidelity.stats(rows)
    assert s.median_abs <= 0.35, fidelity.text_table(rows)


def test_profile_round_trips_and_drives_the_cost_model(loop_result, tmp_path) -> None:
    """The profile YAML reloads identically, and a scenario naming it uses its rates."""
    import moesim

    profile, _ = loop_result
    path = tmp_path / "p.yaml"
    path.write_text(profile_yaml(profile, "test"))
    again = DeviceProfile.model_validate(yaml.safe_load(path.read_text()))
    assert again == profile
    scen = tmp_path / "s.yaml"
    scen.write_text(
        "name: p\ncluster: {preset: single-host-cpu, profile: p.yaml}\n"
        "model: {preset: olmoe-1b-7b, dtype: fp32, d_model: 64, expert_d_ff: 32}\n"
        "parallelism: {dp: 1, ep: 1}\nworkload: {kind: layer, tokens: 64}\n"
    )
    result = moesim.run(moesim.load_scenario(str(scen)))
    assert result.system.layer_costs.roofline.flops_per_s == profile.gemm.flops_per_s
    assert result.summary["time_ms"] > 0


def test_missing_profile_file_is_a_located_error(write) -> None:
    """A profile path that does not exist is reported at the field, not as a traceback."""
    from moesim.errors import ScenarioError

    p = write(
        "s.yaml",
        "name: p\ncluster: {preset: single-host-cpu, profile: nope.yaml}\n"
        "model: olmoe-1b-7b\nparallelism: {dp: 1, ep: 1}\n"
        "workload: {kind: layer, tokens: 4}\n",
    )
    with pytest.raises(ScenarioError) as info:
        moesim_load(p)
    (issue,) = info.value.issues
    assert str(issue).startswith(f"{p}:2:36: cluster.profile: cannot read profile")


def moesim_load(p):
    import moesim

    return moesim.load_scenario(str(p))


def test_fit_rejects_too_few_gemms() -> None:
    """Fitting needs data: a handful of GEMMs is refused with a clear error."""
    with pytest.raises(ValueError, match="at least 4 gemm"):
        fit_gemm([{"kind": "gemm", "M": 1, "K": 8, "N": 8, "dtype": "fp32", "ms": 1.0}])


def test_markdown_reports_target_status() -> None:
    """The Markdown table states whether the target was met."""
    rows = [
        fidelity.Row("m", "loop", "uniform", t, 1.0, 1.0 + e)
        for t, e in ((1, 0.05), (64, -0.1), (4096, 0.3))
    ]
    md = fidelity.markdown(rows, "x", (0.15, None))
    assert "| all | 3 | 10.0% | 30.0% | met |" in md
    md2 = fidelity.markdown(rows, "x", (0.05, None))
    assert "| all | 3 | 10.0% | 30.0% | MISSED |" in md2
    assert np.isclose(fidelity.stats(rows).worst_abs, 0.3)
