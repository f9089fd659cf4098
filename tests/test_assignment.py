"""The capacity / overflow assignment rule (moesim.routing.assignment)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.routing.assignment import assign, capacity_for

# A small case used by several hand-computed tests: 3 tokens, 4 experts, top-2.
RANKING = np.array(
    [
        [0, 1, 2, 3],
        [0, 2, 1, 3],
        [0, 1, 3, 2],
    ]
)
SCORES = np.array(
    [
        [0.50, 0.30, 0.15, 0.05],
        [0.40, 0.35, 0.15, 0.10],
        [0.90, 0.06, 0.03, 0.01],
    ]
)


# --------------------------------------------------------------------- capacity_for


def test_capacity_for_hand_values() -> None:
    """capacity = ceil(cf x T x k / E) on hand-computed values, None when unlimited."""
    assert capacity_for(10, 2, 8, 1.25) == 4  # 25/8 = 3.125 -> 4
    assert capacity_for(8, 2, 8, 1.0) == 2  # exact, no rounding up
    assert capacity_for(7, 1, 4, 1.0) == 2  # 7/4 -> 2
    assert capacity_for(0, 2, 8, 1.0) == 0
    assert capacity_for(16, 1, 4, 0.5) == 2
    assert capacity_for(10, 2, 8, None) is None


def test_capacity_for_decimal_factor_is_exact() -> None:
    """A decimal capacity factor is taken as written: ceil(1.1 x 100 x 4 / 8) = ceil(55) = 55."""
    assert capacity_for(100, 4, 8, 1.1) == 55
    assert capacity_for(100, 2, 8, 2.2) == 55
    assert capacity_for(100, 4, 8, 1.11) == 56  # 55.5 -> 56


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(0, 5000),
    top_k=st.integers(1, 8),
    experts=st.integers(1, 256),
    cf_hundredths=st.integers(1, 800),
)
def test_capacity_for_matches_exact_ceiling(
    tokens: int, top_k: int, experts: int, cf_hundredths: int
) -> None:
    """capacity_for equals the exact rational ceil(cf*T*k/E) for a decimal factor such as 1.25."""
    cf = Fraction(cf_hundredths, 100)
    exact = cf * tokens * top_k / experts
    expected = -((-exact.numerator) // exact.denominator)
    assert capacity_for(tokens, top_k, experts, cf_hundredths / 100) == expected


# --------------------------------------------------------------------- hand cases


def test_drop_token_order_hand_case() -> None:
    """token_order drop: all first choices in token order fill first; t2's first choice drops."""
    a = assign(RANKING, 2, 4, 2, "drop", "token_order")
    # firsts: t0->0 ok, t1->0 ok (expert 0 full), t2->0 rejected; seconds: 1, 2, 1 all fit
    np.testing.assert_array_equal(a.expert, [[0, 1], [0, 2], [-1, 1]])
    np.testing.assert_array_equal(a.counts, [2, 2, 1, 0])
    assert a.dropped == 1
    assert a.capacity == 2
    assert a.rerouted(RANKING) == 0


def test_drop_probability_hand_case() -> None:
    """probability drop: the highest-score slots win; t1's first choice (0.40) drops."""
    a = assign(RANKING, 2, 4, 2, "drop", "probability", SCORES)
    # order by score: t2s0 .9 (e0), t0s0 .5 (e0), t1s0 .4 (e0: full), t1s1 .35 (e2),
    # t0s1 .3 (e1), t2s1 .06 (e1)
    np.testing.assert_array_equal(a.expert, [[0, 1], [-1, 2], [0, 1]])
    np.testing.assert_array_equal(a.counts, [2, 2, 1, 0])
    assert a.dropped == 1


def test_probability_without_scores_falls_back_to_token_order() -> None:
    """priority='probability' with no scores behaves as token_order."""
    a = assign(RANKING, 2, 4, 2, "drop", "probability", None)
    np.testing.assert_array_equal(a.expert, [[0, 1], [0, 2], [-1, 1]])


def test_reroute_token_order_hand_case() -> None:
    """token_order reroute: t2's rejected first slot moves to its third-ranked expert (3)."""
    a = assign(RANKING, 2, 4, 2, "reroute", "token_order")
    np.testing.assert_array_equal(a.expert, [[0, 1], [0, 2], [3, 1]])
    np.testing.assert_array_equal(a.counts, [2, 2, 1, 1])
    assert a.dropped == 0
    assert a.rerouted(RANKING) == 1


def test_reroute_probability_hand_case() -> None:
    """probability reroute: t1's slot tries expert 1 (full) then expert 3 (free)."""
    a = assign(RANKING, 2, 4, 2, "reroute", "probability", SCORES)
    np.testing.assert_array_equal(a.expert, [[0, 1], [3, 2], [0, 1]])
    np.testing.assert_array_equal(a.counts, [2, 2, 1, 1])
    assert a.dropped == 0


def test_reroute_two_slots_of_one_token() -> None:
    """Two rejected slots of one token take its next two ranking entries, in slot order."""
    ranking = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    a = assign(ranking, 2, 4, 1, "reroute", "token_order")
    np.testing.assert_array_equal(a.expert, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(a.counts, [1, 1, 1, 1])
    assert a.rerouted(ranking) == 2


def test_reroute_exhausted_ranking_drops() -> None:
    """A slot whose ranking is exhausted stays dropped under reroute."""
    ranking = np.array([[0, 1], [0, 1], [0, 1]])
    a = assign(ranking, 1, 2, 1, "reroute", "token_order")
    # t0 -> 0, t1 -> 0 rejected -> 1, t2 -> 0 rejected -> 1 rejected (t1 took it) -> nothing
    np.testing.assert_array_equal(a.expert, [[0], [1], [-1]])
    assert a.dropped == 1


def test_dropless_hand_case() -> None:
    """dropless ignores capacity: every slot runs on its chosen expert."""
    a = assign(RANKING, 2, 4, 2, "dropless", "token_order")
    np.testing.assert_array_equal(a.expert, [[0, 1], [0, 2], [0, 1]])
    np.testing.assert_array_equal(a.counts, [3, 2, 1, 0])
    assert a.dropped == 0
    assert a.capacity is None


def test_zero_tokens() -> None:
    """An empty group assigns nothing and counts zero per expert."""
    a = assign(np.zeros((0, 4), dtype=np.int32), 2, 4, 3, "reroute", "token_order")
    assert a.expert.shape == (0, 2)
    np.testing.assert_array_equal(a.counts, [0, 0, 0, 0])


# --------------------------------------------------------------------- reference model


def _reference(
    ranking: np.ndarray,
    k: int,
    experts: int,
    capacity: int | None,
    overflow: str,
    priority: str,
    scores: np.ndarray | None,
) -> list[list[int]]:
    """A slow, literal reading of the module docstring's semantics."""
    tokens, depth = ranking.shape
    if overflow == "dropless" or capacity is None:
        return [[int(ranking[t, j]) for j in range(k)] for t in range(tokens)]
    out = [[-1] * k for _ in range(tokens)]
    left = [capacity] * experts
    pending = [(t, j, j) for t in range(tokens) for j in range(k)]
    nxt = [k] * tokens
    while pending:
        if priority == "probability" and scores is not None:
            pending.sort(key=lambda s: (-scores[s[0], s[2]], s[1], s[0]))
        else:
            pending.sort(key=lambda s: (s[1], s[0]))
        rejected = []
        for t, j, pos in pending:
            e = int(ranking[t, pos])
            if left[e] > 0:
                left[e] -= 1
                out[t][j] = e
            else:
                rejected.append((t, j))
        if overflow != "reroute":
            break
        pending = []
        for t, j in sorted(rejected):
            if nxt[t] < depth:
                pending.append((t, j, nxt[t]))
            nxt[t] += 1
    return out


@st.composite
def routing_case(draw: st.DrawFn) -> dict:
    experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, min(experts, 4)))
    tokens = draw(st.integers(0, 24))
    depth = draw(st.integers(top_k, experts))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ranking = np.array(
        [rng.permutation(experts)[:depth] for _ in range(tokens)], dtype=np.int32
    ).reshape(tokens, depth)
    # distinct scores, decreasing along each row
    scores = -np.sort(-rng.random((tokens, depth)), axis=1)
    capacity = draw(st.none() | st.integers(0, max(1, tokens * top_k)))
    priority = draw(st.sampled_from(["token_order", "probability"]))
    return dict(
        ranking=ranking,
        top_k=top_k,
        experts=experts,
        capacity=capacity,
        priority=priority,
        scores=scores,
    )


def _run(case: dict, overflow: str):
    return assign(
        case["ranking"],
        case["top_k"],
        case["experts"],
        case["capacity"],
        overflow,  # type: ignore[arg-type]
        case["priority"],
        case["scores"],
    )


OVERFLOWS = ["drop", "reroute", "dropless"]


@settings(max_examples=150, deadline=None)
@given(case=routing_case(), overflow=st.sampled_from(OVERFLOWS))
def test_matches_reference_semantics(case: dict, overflow: str) -> None:
    """assign agrees slot for slot with a literal implementation of the documented rule."""
    a = _run(case, overflow)
    expected = _reference(
        case["ranking"],
        case["top_k"],
        case["experts"],
        case["capacity"],
        overflow,
        case["priority"],
        case["scores"],
    )
    assert a.expert.tolist() == expected


@settings(max_examples=150, deadline=None)
@given(case=routing_case(), overflow=st.sampled_from(OVERFLOWS))
def test_conservation_and_capacity(case: dict, overflow: str) -> None:
    """processed + dropped == T*k, counts match the slots, and no expert exceeds capacity."""
    a = _run(case, overflow)
    tokens, k = case["ranking"].shape[0], case["top_k"]
    assert int(a.counts.sum()) + a.dropped == tokens * k
    assert a.counts.shape == (case["experts"],)
    kept = a.expert[a.expert >= 0]
    np.testing.assert_array_equal(a.counts, np.bincount(kept, minlength=case["experts"]))
    if overflow != "dropless" and case["capacity"] is not None:
        assert (a.counts <= case["capacity"]).all()


@settings(max_examples=100, deadline=None)
@given(case=routing_case())
def test_dropless_never_drops(case: dict) -> None:
    """dropless keeps every slot on its original choice, whatever the capacity."""
    a = _run(case, "dropless")
    assert a.dropped == 0
    np.testing.assert_array_equal(a.expert, case["ranking"][:, : case["top_k"]])


@settings(max_examples=100, deadline=None)
@given(case=routing_case(), overflow=st.sampled_from(OVERFLOWS))
def test_unlimited_capacity_never_drops(case: dict, overflow: str) -> None:
    """With capacity None (or capacity >= all slots), no policy drops or reroutes anything."""
    tokens, k = case["ranking"].shape[0], case["top_k"]
    for cap in (None, tokens * k):
        a = _run({**case, "capacity": cap}, overflow)
        assert a.dropped == 0
        np.testing.assert_array_equal(a.expert, case["ranking"][:, :k])


@settings(max_examples=150, deadline=None)
@given(case=routing_case())
def test_drop_keeps_min_of_demand_and_capacity(case: dict) -> None:
    """Under drop, each expert processes min(demand, capacity) slots, all original choices."""
    a = _run(case, "drop")
    k, experts = case["top_k"], case["experts"]
    first_k = case["ranking"][:, :k]
    demand = np.bincount(first_k.ravel(), minlength=experts)
    cap = case["capacity"]
    expected = demand if cap is None else np.minimum(demand, cap)
    np.testing.assert_array_equal(a.counts, expected)
    assert ((a.expert == first_k) | (a.expert == -1)).all()


@settings(max_examples=150, deadline=None)
@given(case=routing_case())
def test_reroute_distinct_experts_and_no_more_drops_than_drop(case: dict) -> None:
    """reroute never gives a token the same expert twice and never drops more than drop."""
    r = _run(case, "reroute")
    d = _run(case, "drop")
    for t, row in enumerate(r.expert):
        held = row[row >= 0]
        assert len(set(held.tolist())) == len(held)
        assert set(held.tolist()) <= set(case["ranking"][t].tolist())
    assert r.dropped <= d.dropped
    # the slots drop keeps are kept identically by reroute (round one is the same)
    kept = d.expert >= 0
    np.testing.assert_array_equal(r.expert[kept], d.expert[kept])


@settings(max_examples=100, deadline=None)
@given(case=routing_case())
def test_reroute_with_full_ranking_drops_only_when_full(case: dict) -> None:
    """With full-depth rankings, reroute drops a slot only if every expert it lacks is full."""
    experts = case["experts"]
    if case["capacity"] is None or case["ranking"].shape[1] != experts:
        return
    r = _run(case, "reroute")
    for row in r.expert:
        if (row < 0).any():
            held = set(row[row >= 0].tolist())
            free = [e for e in range(experts) if e not in held and r.counts[e] < case["capacity"]]
            assert free == []


@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_output_dtypes(overflow: str) -> None:
    """expert is int32 (tokens x top_k) and counts int64 per expert."""
    a = assign(RANKING, 2, 4, 2, overflow)  # type: ignore[arg-type]
    assert a.expert.dtype == np.int32
    assert a.expert.shape == (3, 2)
    assert a.counts.shape == (4,)
    assert np.issubdtype(a.counts.dtype, np.integer)
