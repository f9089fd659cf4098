"""Two-micro-batch overlap (issue 16): the timeline in closed form, its bounds (never
below either stream's work, never above running the two micro-batches one after the
other), and a prefill iteration whose exposed all-to-all shrinks when split."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pools import BASE

from moesim.cost.iteration import IterationCost
from moesim.engine.dual_batch import (
    DualBatchServing,
    MicroBatchOps,
    dual_batch_hooks,
    overlapped_s,
    split_batch,
)
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.loader import scenario_from_dict
from moesim.system import build_system
from moesim.workloads.pools import pool_scenario


def _ops(
    a: float, d: float, e: float, c: float, dense: float = 0.0, h: float = 0.0
) -> MicroBatchOps:
    return MicroBatchOps(
        attention_s=a, dispatch_s=d, experts_s=e, combine_s=c, dense_s=dense, head_s=h
    )


def test_one_moe_layer_by_hand() -> None:
    """One MoE layer, attention 2, dispatch 3, experts 1, combine 4 for both micro-batches:
    compute A.attn [0,2] B.attn [2,4]; comm A.disp [2,5] B.disp [5,8]; A.exp [5,6]
    B.exp [8,9]; A.comb [8,12] B.comb [12,16]; head 0.5 each: A [12,12.5] B [16,16.5]."""
    x = _ops(2, 3, 1, 4, h=0.5)
    assert overlapped_s([True], x, x) == pytest.approx(16.5)


def test_compute_bound_hides_the_wire() -> None:
    """Cheap communication under heavy compute: every layer costs the two micro-batches'
    compute, the all-to-all only shows at the pipeline's ends (one dispatch and one
    combine of the last micro-batch)."""
    layers = 10
    x = _ops(5, 0.5, 5, 0.5)
    span = overlapped_s([True] * layers, x, x)
    assert span == pytest.approx(layers * 2 * (5 + 5) + 0.5, rel=1e-12)


def test_comm_bound_is_the_wire() -> None:
    """Heavy communication: the communication stream is busy back to back after the first
    attention (both dispatches then both combines of every layer)."""
    layers = 6
    x = _ops(0.1, 4, 0.1, 4)
    span = overlapped_s([True] * layers, x, x)
    wire = layers * 2 * (4 + 4)
    assert wire < span < wire + 2 * 0.1 + 2 * 0.1 * layers


def test_dense_layers_only_compute() -> None:
    """Without MoE layers nothing overlaps: the two micro-batches' compute in series."""
    x = _ops(1, 9, 9, 9, dense=2, h=0.25)
    assert overlapped_s([False] * 3, x, x) == pytest.approx(2 * 3 * (1 + 2) + 2 * 0.25)


durations = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=8),
    st.tuples(durations, durations, durations, durations, durations, durations),
    st.tuples(durations, durations, durations, durations, durations, durations),
)
def test_bounded_by_each_stream_and_by_serial(
    moe: list[bool], a: tuple[float, ...], b: tuple[float, ...]
) -> None:
    """The makespan is at least each stream's total work and each micro-batch's own chain,
    and at most both micro-batches run back to back (overlap never costs time)."""
    x, y = _ops(*a), _ops(*b)
    n_moe, n_dense = sum(moe), len(moe) - sum(moe)

    def chain(o: MicroBatchOps) -> tuple[float, float]:
        comp = len(moe) * o.attention_s + n_moe * o.experts_s + n_dense * o.dense_s + o.head_s
        return comp, n_moe * (o.dispatch_s + o.combine_s)

    (cx, wx), (cy, wy) = chain(x), chain(y)
    span = overlapped_s(moe, x, y)
    eps = 1e-9 * (1 + cx + cy + wx + wy)
    assert span >= cx + cy - eps
    assert span >= wx + wy - eps
    assert span >= max(cx + wx, cy + wy) - eps
    assert span <= cx + wx + cy + wy + eps


def test_split_batch_halves() -> None:
    assert split_batch([5, 0, 4]) == ([3, 0, 2], [2, 0, 2])
    assert split_batch([3.0]) == ([1.5], [1.5])


@pytest.fixture(scope="module")
def prefill_cost() -> tuple[IterationCost, DualBatchServing]:
    d = copy.deepcopy(BASE)
    sub = build_system(pool_scenario(scenario_from_dict(d), "prefill"))
    return IterationCost(sub, simulated_layer_cost(sub)), dual_batch_hooks(sub)


def test_prefill_iteration_overlapped(prefill_cost: tuple[IterationCost, DualBatchServing]) -> None:
    """Mixtral prefill, 8 ranks of 4,096 tokens: two micro-batches hide part of the
    all-to-all (the exposed part and the iteration shrink), the parts still sum to the
    total, and the iteration is no shorter than its compute."""
    cost, hooks = prefill_cost
    tok, keys, kv, smp = [4096] * 8, [4096 * 4097 / 2] * 8, [4096] * 8, [1] * 8
    one = cost.time(tok, keys, kv, smp)
    two = hooks.iteration_time(cost, tok, keys, kv, smp)
    assert one.moe_comm_s > 0
    assert two.moe_comm_s < 0.5 * one.moe_comm_s
    assert two.total_s < one.total_s
    parts = two.attention_s + two.moe_s + two.dense_s + two.head_s + two.host_s
    assert parts == pytest.approx(two.total_s, rel=1e-12)
    assert two.total_s >= two.attention_s + two.dense_s + two.head_s
    # one token in all: nothing to split, the un-split iteration
    single = hooks.iteration_time(
        cost, [1] + [0] * 7, [1.0] + [0.0] * 7, [1] + [0] * 7, [1] + [0] * 7
    )
    assert single == cost.time([1] + [0] * 7, [1.0] + [0.0] * 7, [1] + [0] * 7, [1] + [0] * 7)
