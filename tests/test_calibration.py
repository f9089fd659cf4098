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
from moesim.calibrate.numpy_bench import (
    SIZES,
    measure_env,
    measure_host,
    measure_layers,
    scaled_model,
)
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


# -- the loop on a synthetic host: deterministic, whatever the machine's load ---------------

#: the synthetic host's true per-layer routing glue, which the fit must recover
TRUE_GLUE_US = 40.0


def _synthetic_host_primitives() -> list:
    """Records of a host that follows the cost model exactly: fp32 GEMMs on a known
    roofline, 20 GB/s copies, 2 us calls, known activation / gather / scatter costs."""
    mem, elems = 20e9, 1 << 21
    recs: list = [
        {"kind": "env", "backend": "numpy", "processor": "synthetic host"},
        {"kind": "launch", "us_per_kernel": 2.0},
    ]
    for nbytes in (16 << 20, 64 << 20, 256 << 20):
        recs.append(
            {"kind": "copy", "bytes": nbytes, "ms": 2 * nbytes / mem * 1e3, "gbps_rw": 20.0}
        )
    for fn, ns in (("silu", 1.5), ("gelu", 3.0), ("relu", 0.2)):
        ms = (2 * 4 * elems / mem + elems * ns * 1e-9) * 1e3
        recs.append({"kind": "activation", "function": fn, "elements": elems, "ms": ms})
    rows, width = 8192 * 4, 128
    for kind, moved, ns in (("gather", 2, 0.5), ("scatter", 3, 1.0)):
        ms = (moved * 4 * rows * width / mem + rows * width * ns * 1e-9) * 1e3
        recs.append({"kind": kind, "rows": rows, "width": width, "ms": ms})
    rf = Roofline(
        flops_per_s=200e9,
        bytes_per_s=15e9,
        overhead_s=0.0,
        bytes_per_element=4,
        memory_bytes_per_s=15e9,
        smoothness=2.0,
        gemm_overhead_s=3e-6,
        m_tile=8,
    )
    for k, n in ((128, 896), (448, 128), (64, 512), (256, 64), (128, 8)):
        for m in (1, 8, 64, 512, 2048):
            ms = float(rf.gemm_s(m, k, n)) * 1e3
            recs.append({"kind": "gemm", "M": m, "K": k, "N": n, "dtype": "fp32", "ms": ms})
    return recs


def _synthetic_layer(name: str, tokens: int, routing: str, profile: DeviceProfile) -> dict:
    """A layer record as the numpy harness writes it, timed by the simulator's own cost path
    (``profile``) on per-expert counts drawn from the routing's popularity."""
    from moesim.calibrate.predict import predict_replayed_s, scenario_for
    from moesim.rng import stream

    model = scaled_model(name, TINY.scale)
    e, k = model.experts, model.top_k
    p = np.ones(e) if routing == "uniform" else 1.0 / np.arange(1, e + 1)
    rng = stream(7, "synthetic-layer", tokens, e)
    counts = np.zeros(e, dtype=int)
    for _ in range(tokens):
        counts[rng.choice(e, size=k, replace=False, p=p / p.sum())] += 1
    rec = {
        "kind": "moe_layer",
        "backend": "numpy",
        "model": name,
        "impl": "loop",
        "tokens": tokens,
        "routing": routing,
        "seed": 7,
        "scale": TINY.scale,
        "experts": e,
        "top_k": k,
        "d_model": model.d_model,
        "expert_d_ff": model.expert_d_ff,
        "activation": model.activation,
        "shared_experts": model.shared_experts,
        "shared_expert_d_ff": model.shared_d_ff,
        "counts": [int(c) for c in counts],
    }
    scen = scenario_for(rec, profile, "single-host-cpu", "numpy")
    rec["ms"] = predict_replayed_s(scen, rec["counts"]) * 1e3
    return rec


@pytest.fixture(scope="module")
def synthetic_loop() -> tuple[DeviceProfile, list[fidelity.Row]]:
    """calibrate -> profile -> simulate -> compare on a synthetic host whose layers carry a
    known glue of TRUE_GLUE_US: the fitted profile and the held-out rows."""
    prims = _synthetic_host_primitives()
    bare = fit_from_records(prims, "synthetic primitives", ())
    true = bare.model_copy(update={"layer_overhead_us": TRUE_GLUE_US})

    def layers(models: tuple[str, ...]) -> list:
        return [
            _synthetic_layer(m, t, r, true)
            for m in models
            for t in TINY.tokens
            for r in ("uniform", "zipf1")
        ]

    profile = fit_from_records(
        [*prims, *layers(TINY.fit_models)], "synthetic measurements", TINY.fit_models
    )
    rows = fidelity.compare(
        layers(TINY.heldout_models),
        profile,
        backend="numpy",
        cluster="single-host-cpu",
        exclude_models=TINY.fit_models,
    )
    return profile, rows


def test_loop_recovers_a_synthetic_host(synthetic_loop) -> None:
    """On a host that follows the cost model, the fit recovers its GEMM rates, bandwidth and layer glue."""
    profile, _ = synthetic_loop
    assert profile.backend == "numpy" and profile.dtype == "fp32"
    assert profile.device == "synthetic host"
    assert profile.gemm.flops_per_s == pytest.approx(200e9, rel=0.02)
    assert profile.gemm.bytes_per_s == pytest.approx(15e9, rel=0.02)
    assert profile.gemm.m_tile == 8
    assert profile.memory_bytes_per_s == pytest.approx(20e9)
    assert profile.kernel_overhead_us == pytest.approx(2.0)
    assert profile.activation_ns_per_element["gelu"] == pytest.approx(3.0)
    assert profile.layer_overhead_us == pytest.approx(TRUE_GLUE_US, rel=1e-6)
    assert profile.layer_fit is not None and profile.layer_fit.median_abs_error < 1e-4


def test_loop_predicts_held_out_layers_of_a_synthetic_host(synthetic_loop) -> None:
    """The fitted profile predicts every held-out layer of the synthetic host within 3% (median 1%)."""
    _, rows = synthetic_loop
    assert len(rows) == 2 * len(TINY.tokens) * len(TINY.heldout_models)
    assert {r.model for r in rows} == set(TINY.heldout_models)  # the fit model is held out
    s = fidelity.stats(rows)
    assert s.median_abs <= 0.01 and s.worst_abs <= 0.03, fidelity.text_table(rows)


# -- the loop on this host's real numpy timings: wall clock, so only on an idle machine ----


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


@pytest.mark.timing
def test_numpy_loop_predicts_held_out_layers(loop_result) -> None:
    """calibrate -> profile -> simulate -> compare on this host's held-out shapes stays within the bound.

    The bound (median |error| <= 35%) is looser than the issue's 15% target for full runs:
    this tiny CI size on a shared 2-vCPU machine has timing noise of that order. It times
    real numpy work, so a loaded machine fails it: the `timing` marker keeps it out of the
    default run and CI (`pytest -m timing` runs it).
    """
    _profile, rows = loop_result
    assert len(rows) == 2 * len(TINY.tokens) * len(TINY.heldout_models)
    assert {r.model for r in rows} == set(TINY.heldout_models)  # the fit model is held out
    s = fidelity.stats(rows)
    assert s.median_abs <= 0.35, fidelity.text_table(rows)


def test_profile_round_trips_and_drives_the_cost_model(synthetic_loop, tmp_path) -> None:
    """The profile YAML reloads identically, and a scenario naming it uses its rates."""
    import moesim

    profile, _ = synthetic_loop
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
    assert str(issue).startswith(f"{p}:2:36: cluster.profile: cannot read file")


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
