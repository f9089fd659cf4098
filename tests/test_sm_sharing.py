"""SMs taken from the compute by DeepEP's normal kernels in the two-micro-batch timeline
(issue 16): rate 1 is the plain timeline, closed forms for one layer, bounds (Hypothesis),
and which layouts it applies to."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.dual_batch import MicroBatchOps, overlapped_s
from moesim.engine.sm_sharing import compute_rate_during_comm, shared_overlapped_s
from moesim.loader import scenario_from_dict

durations = st.floats(0.0, 5.0, allow_nan=False)
ops = st.builds(MicroBatchOps, durations, durations, durations, durations, durations, durations)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=6), ops, ops, st.floats(0.2, 1.0))
def test_bounds_and_rate_one(moe: list[bool], a: MicroBatchOps, b: MicroBatchOps, r: float) -> None:
    """Rate 1 gives the plain timeline's makespan; a slower compute never shortens it and
    at most stretches it to the plain timeline with every compute op divided by the rate."""
    plain = overlapped_s(moe, a, b)
    assert shared_overlapped_s(moe, a, b, 1.0) == pytest.approx(plain, rel=1e-12, abs=1e-12)

    def slow(o: MicroBatchOps) -> MicroBatchOps:
        return MicroBatchOps(
            o.attention_s / r,
            o.dispatch_s,
            o.experts_s / r,
            o.combine_s,
            o.dense_s / r,
            o.head_s / r,
        )

    shared = shared_overlapped_s(moe, a, b, r)
    assert plain - 1e-9 <= shared <= overlapped_s(moe, slow(a), slow(b)) + 1e-9


def test_one_layer_by_hand() -> None:
    """One MoE layer, attention 1, dispatch 2, experts 1, combine 1, no head. Plain: A.att
    0-1, B.att 1-2, A.dispatch 1-3, B.dispatch 3-5, A.experts 3-4, B.experts 5-6, A.combine
    5-6, B.combine 6-7. Rate 0.5: A.att 0-1, B.att 1-3 (half speed under A.dispatch 1-3),
    B.dispatch 3-5, A.experts 3-5 (half speed under B.dispatch), A.combine 5-6,
    B.experts 5-7 (half speed 5-6 under A.combine, then full: 0.5 done at 6, 6-6.5),
    B.combine 6.5-7.5."""
    a = MicroBatchOps(1.0, 2.0, 1.0, 1.0, 0.0, 0.0)
    assert overlapped_s([True], a, a) == pytest.approx(7.0)
    assert shared_overlapped_s([True], a, a, 0.5) == pytest.approx(7.5)


def _acc_par(a2a: dict[str, str]) -> tuple[object, object]:
    s = scenario_from_dict(
        {
            "name": "sm",
            "cluster": {"preset": "h800-rail", "nodes": 2},
            "model": "deepseek-v3",
            "parallelism": {"dp": 16, "ep": 16, **a2a},
            "workload": {"kind": "layer", "tokens": 1024},
        }
    )
    return s.cluster.accelerator, s.parallelism


def test_rate_applies_to_deepep_normal_only() -> None:
    """(132 - 20) / 132 on the H800 with DeepEP's normal kernels; 1 with low-latency
    kernels or another all-to-all."""
    acc, p = _acc_par({"a2a": "deepep", "a2a_mode": "normal"})
    assert compute_rate_during_comm(acc, p) == pytest.approx(112 / 132)  # type: ignore[arg-type]
    for a2a in ({"a2a": "deepep", "a2a_mode": "low_latency"}, {"a2a": "direct"}):
        acc, p = _acc_par(a2a)
        assert compute_rate_during_comm(acc, p) == 1.0  # type: ignore[arg-type]
