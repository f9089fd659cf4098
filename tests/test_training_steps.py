"""Training steps: precision recipes, gradient synchronisation, the step-kernel fit, and
validation against single-GPU steps measured on an H200 (2026-12-03, torch 2.11 + CUDA 13,
``moesim/catalog/measurements/h200_torch_training_2026-12-03.jsonl``, measured by
``python3 -m moesim.calibrate.torch_train``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moesim.calibrate import records as rec_io
from moesim.calibrate.step_fit import fit_step_kernels, optimizer_bytes_per_param
from moesim.calibrate.training_commands import (
    calibrate_training,
    compare,
    compare_dist,
    dist_scenario,
    rankings,
    summary,
)
from moesim.config.step_kernels import StepKernelFit
from moesim.engine.training import simulate_training
from moesim.loader import scenario_from_dict
from moesim.system import build_system

MEASURED = (
    Path(__file__).resolve().parent.parent
    / "moesim/catalog/measurements/h200_torch_training_2026-12-03.jsonl"
)


def _scenario(**workload: object) -> dict:
    return {
        "name": "t",
        "seed": 0,
        "cluster": {"preset": "dgx-h100", "nodes": 1},
        "model": {"preset": "olmoe-1b-7b", "layers": 2},
        "routing": {"kind": "uniform"},
        "parallelism": {"dp": 8},
        "workload": {"kind": "training", "seq_len": 1024, "microbatches": 1, **workload},
    }


def _run(data: dict):
    s = scenario_from_dict(data)
    return simulate_training(build_system(s), s.workload)


def test_precision_recipes_set_widths_and_state():
    bf16 = scenario_from_dict(_scenario()).workload
    amp = scenario_from_dict(_scenario(precision="amp_fp32_master")).workload
    assert (bf16.weight_bytes, bf16.grad_bytes, bf16.state_bytes) == (2, 2, 12)
    assert (amp.weight_bytes, amp.grad_bytes, amp.state_bytes) == (4, 4, 8)
    explicit = scenario_from_dict(_scenario(optimizer_bytes_per_param=4)).workload
    assert explicit.state_bytes == 4


def test_amp_costs_more_memory_time_and_sync():
    a = _run(_scenario())
    b = _run(_scenario(precision="amp_fp32_master"))
    assert b.memory.weights == 2 * a.memory.weights
    assert b.memory.gradients == 2 * a.memory.gradients
    assert b.grad_sync_s > 1.5 * a.grad_sync_s  # fp32 gradients: twice the bytes
    assert b.stages[0].fwd_s > a.stages[0].fwd_s  # weight casts, fp32 residual stream


def test_bucketed_sync_overlaps_backward():
    flat = _run(_scenario(grad_sync="flat"))
    bucketed = _run(_scenario(grad_sync="bucketed", bucket_mb=25))
    one_bucket = _run(_scenario(grad_sync="bucketed", bucket_mb=1e6))
    assert 0 < bucketed.grad_sync_s < flat.grad_sync_s
    # a single bucket is ready only when the backward ends: nothing overlaps
    assert one_bucket.grad_sync_s >= 0.95 * flat.grad_sync_s


def test_no_sync_on_one_device():
    rec = _run(
        {**_scenario(grad_sync="bucketed"), "cluster": {"preset": "single-h200"}, "parallelism": {}}
    )
    assert rec.grad_sync_s == 0.0


def test_step_fit_recovers_known_kernels():
    truth = StepKernelFit(
        attention_tflops=500.0,
        attention_seq_knee=800.0,
        attention_overhead_us=40.0,
        attention_bwd_tflops=200.0,
        attention_bwd_seq_knee=100.0,
        attention_bwd_overhead_us=200.0,
        cross_entropy_fwd_bytes_per_logit=28.0,
        cross_entropy_bwd_bytes_per_logit=26.0,
        norm_fwd_passes=1.5,
        norm_fwd_overhead_us=15.0,
        norm_bwd_passes=3.5,
        norm_bwd_overhead_us=200.0,
        optimizer_ps_per_param=2.5,
        optimizer_bytes_per_s=4.5e12,
        source="synthetic",
    )
    bw = 4.0e12
    recs: list[dict] = []
    for b, n, h, d in (
        (1, 4096, 16, 128),
        (8, 1024, 16, 128),
        (2, 2048, 48, 128),
        (1, 8192, 32, 128),
    ):
        flops = 4.0 * b * h * n * n * d / 2
        f = truth.attention_overhead_us * 1e-6 + flops * (n + truth.attention_seq_knee) / (
            truth.attention_tflops * 1e12 * n
        )
        bk = truth.attention_bwd_overhead_us * 1e-6 + flops * (n + truth.attention_bwd_seq_knee) / (
            truth.attention_bwd_tflops * 1e12 * n
        )
        recs.append(
            dict(
                kind="sdpa",
                sequences=b,
                seq=n,
                heads=h,
                head_dim=d,
                fwd_ms=f * 1e3,
                fwd_bwd_ms=(f + bk) * 1e3,
            )
        )
    for t, v in ((4096, 32000), (16384, 50304)):
        f, bk = 28.0 * t * v / bw, 26.0 * t * v / bw
        recs.append(
            dict(kind="cross_entropy", tokens=t, vocab=v, fwd_ms=f * 1e3, fwd_bwd_ms=(f + bk) * 1e3)
        )
    for t, d, dt in ((8192, 2048, "bfloat16"), (16384, 4096, "bfloat16"), (8192, 2048, "float32")):
        one = 2.0 * t * d * (2 if dt == "bfloat16" else 4) / bw
        f, bk = 15e-6 + 1.5 * one, 200e-6 + 3.5 * one
        recs.append(
            dict(
                kind="rmsnorm",
                tokens=t,
                d_model=d,
                dtype=dt,
                fwd_ms=f * 1e3,
                fwd_bwd_ms=(f + bk) * 1e3,
            )
        )
    for p, dt in ((2**28, "bfloat16"), (2**30, "bfloat16"), (2**28, "float32")):
        per = optimizer_bytes_per_param("bf16" if dt == "bfloat16" else "fp32")
        recs.append(dict(kind="adamw", params=p, dtype=dt, ms=p * (2.5e-12 + per / 4.5e12) * 1e3))
    fit = fit_step_kernels(recs, bw, "synthetic")
    for field in (
        "attention_tflops",
        "attention_seq_knee",
        "cross_entropy_fwd_bytes_per_logit",
        "norm_bwd_passes",
        "optimizer_ps_per_param",
        "optimizer_bytes_per_s",
    ):
        assert getattr(fit, field) == pytest.approx(getattr(truth, field), rel=1e-3), field
    assert (fit.fit_median_abs_error or 0) < 1e-6


def test_step_fit_names_missing_primitives():
    with pytest.raises(ValueError, match="sdpa"):
        fit_step_kernels([{"kind": "adamw", "params": 1, "dtype": "float32", "ms": 1.0}], 1e12, "x")


def test_calibrate_training_writes_the_profile_section(tmp_path):
    shipped = Path(__file__).resolve().parent.parent / "moesim/catalog/profiles/h200-sxm.yaml"
    prof = tmp_path / "p.yaml"
    shutil.copy(shipped, prof)
    assert calibrate_training(str(MEASURED), str(prof)) == 0
    text = prof.read_text()
    assert "training:" in text and "attention_tflops" in text
    with pytest.raises(SystemExit, match="no such device profile"):
        calibrate_training(str(MEASURED), str(tmp_path / "missing.yaml"))


@pytest.mark.slow
def test_training_steps_match_h200_measurements():
    """Held-out single-GPU steps (models, layer counts and sequence lengths not looked at
    while the step model was built: OLMoE x 8 layers at 2k-token sequences, Mixtral-8x7B x 4,
    DBRX x 1, Mixtral-8x22B x 1; bf16 and autocast over fp32 master weights)."""
    rows = compare(rec_io.read(MEASURED), None)
    held = summary(rows)["held out"]
    assert len([r for r in rows if r["set"] == "held out"]) >= 12
    med, worst = held["step"]
    assert med <= 0.10 and worst <= 0.10, held["step"]  # every held-out step within 10%
    assert held["opt"][0] <= 0.05, held["opt"]
    assert held["fwd"][0] <= 0.10, held["fwd"]
    assert held["fwd_bwd"][0] <= 0.10, held["fwd_bwd"]
    assert held["peak"][0] <= 0.10 and held["peak"][1] <= 0.15, held["peak"]


@pytest.mark.slow
def test_padded_training_steps_follow_the_capacity_factor():
    """Measured Mixtral-8x7B (2 layers, bf16) steps with Switch-style padded experts at
    capacity factors 1.0 / 1.25 / 2.0 (same file): the step time grows with the capacity
    factor in moesim as on the H200, CF 2.0 / CF 1.0 within 15% of the measured ratio, and
    every step within 20%."""
    rows = compare(rec_io.read(MEASURED), None, ("padded",))
    rows.sort(key=lambda r: r["record"]["capacity_factor"])
    assert [r["record"]["capacity_factor"] for r in rows] == [1.0, 1.25, 2.0]
    pred = [r["predicted"]["step"] for r in rows]
    meas = [r["measured"]["step"] for r in rows]
    assert pred == sorted(pred) and pred[0] < pred[-1]
    assert pred[-1] / pred[0] == pytest.approx(meas[-1] / meas[0], rel=0.15)
    assert all(abs(p / m - 1) <= 0.20 for p, m in zip(pred, meas, strict=True)), (pred, meas)


def _dist(layout: str, step_ms: float, sync: str = "bucketed") -> dict:
    return {
        "kind": "dist_train_step",
        "world": 2,
        "model": "olmoe-1b-7b",
        "layers": 2,
        "precision": "bf16",
        "layout": layout,
        "grad_sync": sync,
        "bucket_mb": 25 if sync == "bucketed" else None,
        "tokens_per_rank": 4096,
        "seq_len": 4096,
        "sequences": 1,
        "step_ms": step_ms,
        "peak_bytes": 30 * 2**30,
    }


def test_dist_steps_become_two_gpu_scenarios_and_rankings():
    """torch_train_dist records map to h200x2 scenarios of the same layout and gradient
    sync, and the DP-vs-EP ranking compares the faster layout measured and predicted."""
    recs = [_dist("dp", 300.0), _dist("ep", 200.0)]
    for r in recs:
        s = scenario_from_dict(dist_scenario(r, None))
        assert s.parallelism.dp == 2 and s.parallelism.ep == (2 if r["layout"] == "ep" else 1)
        assert s.workload.grad_sync == "bucketed" and s.workload.persistent_grads
    rows = compare_dist(recs, None)
    ranks = rankings(rows)
    assert len(ranks) == 1 and ranks[0]["measured_faster"] == "ep"
    assert ranks[0]["measured_ep_over_dp"] == pytest.approx(200 / 300)
    pred = "ep" if rows[1]["predicted"]["step"] < rows[0]["predicted"]["step"] else "dp"
    assert ranks[0]["predicted_faster"] == pred
    flat = scenario_from_dict(dist_scenario(_dist("dp", 1.0, "flat"), None)).workload
    assert flat.grad_sync == "flat" and not flat.persistent_grads


def test_freed_gradients_peak_only_for_one_microbatch_on_one_stage():
    """Gradients freed between steps lower the peak only when nothing runs forward after a
    backward started: with gradient accumulation they coexist with later activations."""
    base = {**_scenario(), "cluster": {"preset": "single-h200"}, "parallelism": {}}
    one = {**base, "workload": {**base["workload"], "microbatches": 1}}
    many = {**base, "workload": {**base["workload"], "microbatches": 4}}

    def total(data: dict, persistent: bool) -> int:
        data = {**data, "workload": {**data["workload"], "persistent_grads": persistent}}
        return _run(data).memory.total

    assert total(one, False) < total(one, True)
    assert total(many, False) == total(many, True)


def test_autocast_weight_copies_are_whole_blocks_under_zero3():
    """Autocast's bf16 copies are of the gathered weights, so ZeRO-3 does not shrink them."""
    amp = {"precision": "amp_fp32_master"}
    z1 = _run(_scenario(zero_stage=1, **amp)).memory.activations
    z3 = _run(_scenario(zero_stage=3, **amp)).memory.activations
    assert z1 == z3


def test_full_recompute_reruns_the_collectives():
    none = _run(_scenario(recompute="none")).stages[0]
    full = _run(_scenario(recompute="full")).stages[0]
    assert full.a2a_s == pytest.approx(1.5 * none.a2a_s)


def test_bucket_size_trades_overlap_against_per_call_latency():
    """Thousands of 0.1 MB buckets (the smallest allowed, priced without a loop per bucket)
    pay each all-reduce's fixed latency and expose more than the flat all-reduce; 25 MB
    buckets overlap the backward and expose less."""
    flat = _run(_scenario(grad_sync="flat")).grad_sync_s
    tiny = _run(_scenario(grad_sync="bucketed", bucket_mb=0.1)).grad_sync_s
    ddp = _run(_scenario(grad_sync="bucketed", bucket_mb=25)).grad_sync_s
    assert ddp < flat < tiny
