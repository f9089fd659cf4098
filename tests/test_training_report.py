"""The training summary and its terminal table: every figure shown as computed, the
ZeRO-Offload and expert-streaming rows, and the warning of a layout that does not fit."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

import moesim
from moesim.loader import scenario_from_dict
from moesim.report.training import memory_problem, training_table

#: a small step: four Mixtral layers, one per pipeline stage, four short micro-batches
BASE: dict[str, Any] = {
    "name": "train-report",
    "seed": 1,
    "cluster": {"preset": "h100-rail", "nodes": 2},
    "model": {"preset": "mixtral-8x7b", "layers": 4},
    "parallelism": {"dp": 4, "pp": 4, "ep": 4},
    "policies": {"capacity_factor": 1.25},
    "workload": {"kind": "training", "seq_len": 256, "micro_batch_sequences": 1, "microbatches": 4},
}
ZERO_OFFLOAD = {"capacity_factor": 1.25, "offload": {"optimizer": True}}
STREAMED = {
    "capacity_factor": 1.25,
    "offload": {"optimizer": True, "experts": {"policy": "static", "cache_experts": 1}},
}
#: the whole model on 16 GPUs without pipeline stages or ZeRO sharding: ~194 GiB per GPU
TOO_BIG = {"model": "mixtral-8x7b", "parallelism": {"dp": 16, "ep": 4}}


@cache
def _summary(variant: str) -> dict[str, Any]:
    extra = {
        "base": {},
        "zero": {"policies": ZERO_OFFLOAD},
        "streamed": {"policies": STREAMED},
        "too-big": TOO_BIG,
    }[variant]
    return moesim.run(scenario_from_dict({**BASE, **extra})).summary


def _rows(table: str) -> dict[str, str]:
    """The table's rows as label -> text (labels are left-justified to a common width)."""
    lines = table.splitlines()
    # values start in one column: the first after a two-space gap on every line
    start = next(
        c
        for c in range(2, min(map(len, lines)))
        if all(x[c - 2 : c] == "  " and x[c] != " " for x in lines)
    )
    return {x[:start].strip(): x[start:] for x in lines}


def test_breakdown_adds_up_to_the_step() -> None:
    """The step breakdown (compute, all-to-all, all-reduce, ZeRO gathers, bubble, other) sums to the step time."""
    s = _summary("base")
    assert list(s["breakdown_ms"]) == [
        "compute",
        "all_to_all",
        "all_reduce",
        "zero_gather",
        "pipeline_bubble",
        "other",
    ]
    assert sum(s["breakdown_ms"].values()) == pytest.approx(s["step_time_ms"], abs=1e-5)
    assert s["tokens_per_step"] == 4 * 4 * 256  # dp x micro-batches x sequence length
    assert s["tokens_per_s"] == pytest.approx(s["tokens_per_step"] / s["step_time_ms"] * 1e3)
    assert "offload" not in s and s["memory_fits"]


def test_table_shows_each_summary_figure() -> None:
    """Every row of the training table prints the summary's own value, and no offload or warning row appears."""
    s = _summary("base")
    b, g = s["breakdown_ms"], s["memory_gib"]
    rows = _rows(training_table(s))
    assert rows == {
        "scenario": "train-report  (seed 1)",
        "model / cluster": "mixtral-8x7b on h100-rail (16 devices)",
        "layout": "dp=4 tp=1 pp=4 ep=4 etp=1  schedule 1f1b",
        "step time": f"{s['step_time_ms']:.3f} ms",
        "breakdown": "  ".join(f"{k} {v:.3f}" for k, v in b.items()) + "  (ms)",
        "throughput": f"{s['tokens_per_s']:.1f} tokens/s  MFU {100 * s['mfu']:.1f}%",
        "bubble": f"{100 * s['bubble_fraction']:.1f}% of the pipeline phase",
        "memory / device": (
            f"{g['total']:.2f} of {g['capacity']:.2f} GiB  (weights {g['weights']:.2f}, grads "
            f"{g['gradients']:.2f}, optimizer {g['optimizer']:.2f}, activations "
            f"{g['activations']:.2f})"
        ),
        "dropped": f"{100 * s['dropped_fraction']:.2f}% of expert slots",
    }


def test_zero_offload_is_the_breakdowns_other() -> None:
    """With ZeRO-Offload the optimizer states leave the device and the copies plus CPU Adam are the breakdown's `other`."""
    base, s = _summary("base"), _summary("zero")
    o = s["offload"]
    assert s["memory_gib"]["optimizer"] == 0.0
    assert o["optimizer_on_host_gib"] == pytest.approx(base["memory_gib"]["optimizer"], abs=1e-3)
    assert o["grad_d2h_ms"] == o["param_h2d_ms"] > 0  # the same bytes each way
    assert o["grad_d2h_ms"] + o["cpu_step_ms"] + o["param_h2d_ms"] == pytest.approx(
        s["breakdown_ms"]["other"], abs=1e-5
    )
    assert "streamed_experts_per_pass" not in o  # no expert offloading: no streaming figures
    assert _rows(training_table(s))["ZeRO-Offload"] == (
        f"{o['optimizer_on_host_gib']:.2f} GiB of optimizer state on the host; gradients out "
        f"{o['grad_d2h_ms']:.1f} + CPU Adam {o['cpu_step_ms']:.1f} + weights in "
        f"{o['param_h2d_ms']:.1f} ms"
    )


def test_streamed_experts_row() -> None:
    """With experts offloaded in training the table states the experts streamed per pass and the copy-bound passes."""
    s = _summary("streamed")
    o = s["offload"]
    # a device holds 2 experts of its one layer (8 experts / ep 4) and caches 1
    assert o["streamed_experts_per_pass"] == 1
    passes = 2 * len(s["stage_ms"])  # a forward and a backward per stage
    assert 0 <= o["copy_bound_passes"] <= passes
    assert _rows(training_table(s))["experts"] == (
        f"1 streamed per pass in {o['expert_copy_ms_per_pass']:.1f} ms; "
        f"{o['copy_bound_passes']} of {passes} stage passes copy-bound"
    )


def test_a_layout_that_does_not_fit_is_a_warning_row() -> None:
    """A stage-0 device over its memory gets a WARNING row naming each part and the capacity; a fitting one none."""
    s = _summary("too-big")
    g = s["memory_gib"]
    assert not s["memory_fits"] and g["total"] > g["capacity"]
    problem = memory_problem(s)
    assert problem == (
        f"does not fit: a pipeline-stage-0 device needs {g['total']:.2f} GiB (weights "
        f"{g['weights']:.2f}, gradients {g['gradients']:.2f}, optimizer {g['optimizer']:.2f}, "
        f"activations {g['activations']:.2f}, comm_buffers {g['comm_buffers']:.2f}) but has "
        f"{g['capacity']:.2f} GiB"
    )
    assert training_table(s).splitlines()[-1].split(None, 1) == ["WARNING", problem]
    assert memory_problem(_summary("base")) is None
