"""The lean engine's pure parts (no torch here): its plan, its graph buckets, and the
engine semantics it states for ``moesim calibrate`` (a valid engine preset)."""

from __future__ import annotations

import pytest

from moesim.calibrate.serving_commands import engine_semantics
from moesim.calibrate.torch_lean_engine import LeanConfig, lean_plan, semantics
from moesim.loader import scenario_from_dict


def test_buckets_round_up_and_refuse_what_no_graph_covers() -> None:
    lean = LeanConfig()
    assert [lean.bucket(lean.batch_buckets, n) for n in (1, 3, 17, 128)] == [1, 4, 24, 128]
    assert lean.bucket(lean.context_buckets, 513) == 768
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        lean.bucket(lean.batch_buckets, 129)


def test_plan_holds_out_other_lengths_and_seeds_and_fits_its_slots() -> None:
    lean = LeanConfig()
    plan = lean_plan(False, 7)
    held = [s for s in plan if s.held_out]
    fit = [s for s in plan if not s.held_out]
    assert held and fit
    assert {s.prompt_range for s in held}.isdisjoint({s.prompt_range for s in fit})
    assert len({s.seed for s in plan}) == len(plan)
    # every request fits one KV slot: prompt + output - 1 cached tokens at most
    assert all(s.prompt_range[1] + s.output_tokens - 1 <= lean.max_len for s in plan)


def test_stated_semantics_are_a_valid_engine_preset() -> None:
    """What the lean engine writes in its env record is what calibrate takes, and it
    validates as an engine (its scheduler admits whole prompts, graphs, fused attention)."""
    stated = semantics(LeanConfig(), "2.11.0")
    base = engine_semantics({"semantics": stated, "cb_config": {"max_batch_tokens": 1}})
    assert base == stated
    w = {
        "kind": "serving",
        "duration_s": 1.0,
        "arrival": {
            "kind": "trace",
            "arrival_s": [0.0],
            "prompt_tokens": [600],
            "output_tokens": [128],
        },
        "engine": {"preset": "ideal", **base, "name": "lean"},
    }
    s = scenario_from_dict(
        {"name": "lean", "cluster": "single-h200", "model": "mixtral-8x7b", "workload": w}
    )
    assert s.cluster.launch == "graph"
    assert s.workload.scheduler.chunked_prefill is False  # type: ignore[union-attr]
    assert s.workload.engine.attention == "fused"  # type: ignore[union-attr]
