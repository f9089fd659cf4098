"""The concrete parallel layout: tokens and experts per device (moesim.layout)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.parallelism import ParallelismConfig
from moesim.layout import Layout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    dp = draw(st.integers(1, 8))
    tp = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.integers(1, 3))
    stage = dp * tp
    etp = draw(st.sampled_from(_divisors(stage)))
    ep = draw(st.sampled_from(_divisors(stage // etp)))
    experts = ep * draw(st.integers(1, 4))
    placement = draw(st.sampled_from(["contiguous", "round_robin"]))
    p = ParallelismConfig(dp=dp, tp=tp, pp=pp, ep=ep, etp=etp, placement=placement)
    return Layout.of(p, experts)


def test_contiguous_owner() -> None:
    """contiguous placement gives each EP rank a block of experts/ep consecutive experts."""
    lay = Layout.of(ParallelismConfig(dp=4, ep=4), 8)
    np.testing.assert_array_equal(lay.owner, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(lay.local_experts(2), [4, 5])


def test_round_robin_owner() -> None:
    """round_robin placement deals experts to EP ranks in turn."""
    lay = Layout.of(ParallelismConfig(dp=4, ep=4, placement="round_robin"), 8)
    np.testing.assert_array_equal(lay.owner, [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(lay.local_experts(1), [1, 5])


def test_explicit_placement() -> None:
    """An explicit placement list is the owner array as given."""
    lay = Layout.of(ParallelismConfig(dp=2, ep=2, placement=[1, 0, 0, 1]), 4)
    np.testing.assert_array_equal(lay.owner, [1, 0, 0, 1])
    np.testing.assert_array_equal(lay.local_experts(0), [1, 2])


def test_hand_layout_ranks() -> None:
    """dp=4, tp=2, ep=2, etp=2: edp=2 groups of 4 ranks; the ep rank's shards are etp-adjacent."""
    lay = Layout.of(ParallelismConfig(dp=4, tp=2, pp=2, ep=2, etp=2), 4)
    assert lay.stage_ranks == 8
    assert lay.edp == 2
    assert lay.expert_devices(0, 0, 0) == [0, 1]
    assert lay.expert_devices(0, 0, 1) == [2, 3]
    assert lay.expert_devices(0, 1, 0) == [4, 5]
    assert lay.expert_devices(1, 1, 1) == [14, 15]
    assert [lay.edp_group(i) for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lay.device(1, 3) == 11


def test_tokens_per_rank_hand_case() -> None:
    """5 tokens over dp=2, tp=2: dp split 3/2, then tp split 2/1 and 1/1."""
    lay = Layout.of(ParallelismConfig(dp=2, tp=2), 1)
    np.testing.assert_array_equal(lay.tokens_per_rank(5), [2, 1, 1, 1])
    np.testing.assert_array_equal(lay.tokens_per_rank(0), [0, 0, 0, 0])


@settings(max_examples=150, deadline=None)
@given(lay=layouts(), tokens=st.integers(0, 5000))
def test_tokens_per_rank_sums_and_is_even(lay: Layout, tokens: int) -> None:
    """Tokens per rank sum to T, differ by at most one, and are equal when dp*tp divides T."""
    t = lay.tokens_per_rank(tokens)
    assert t.shape == (lay.dp * lay.tp,)
    assert int(t.sum()) == tokens
    assert (t >= 0).all()
    assert int(t.max() - t.min()) <= 1
    if tokens % (lay.dp * lay.tp) == 0:
        assert (t == tokens // (lay.dp * lay.tp)).all()
    # the dp replicas (tp consecutive ranks each) also differ by at most one token
    per_dp = t.reshape(lay.dp, lay.tp).sum(axis=1)
    assert int(per_dp.max() - per_dp.min()) <= 1


@settings(max_examples=150, deadline=None)
@given(lay=layouts())
def test_expert_devices_partition_each_stage(lay: Layout) -> None:
    """Over all (edp group, ep rank), expert devices cover each stage's ranks exactly once."""
    assert lay.ep * lay.etp * lay.edp == lay.dp * lay.tp
    for stage in range(lay.pp):
        seen: list[int] = []
        for group in range(lay.edp):
            for r in range(lay.ep):
                devs = lay.expert_devices(stage, group, r)
                assert len(devs) == lay.etp
                seen += devs
                for x, dev in enumerate(devs):
                    local = dev - stage * lay.dp * lay.tp
                    # the documented rank decomposition: etp fastest, then ep, then edp
                    assert local % lay.etp == x
                    assert (local // lay.etp) % lay.ep == r
                    assert lay.edp_group(local) == group
        first = stage * lay.dp * lay.tp
        assert sorted(seen) == list(range(first, first + lay.dp * lay.tp))


@settings(max_examples=100, deadline=None)
@given(lay=layouts())
def test_every_expert_has_one_owner_and_ranks_are_balanced(lay: Layout) -> None:
    """Each expert has an EP rank in [0, ep), and contiguous/round_robin give experts/ep each."""
    assert lay.owner.shape == (lay.experts,)
    assert ((lay.owner >= 0) & (lay.owner < lay.ep)).all()
    held = np.concatenate([lay.local_experts(r) for r in range(lay.ep)])
    assert sorted(held.tolist()) == list(range(lay.experts))
    for r in range(lay.ep):
        assert len(lay.local_experts(r)) == lay.experts // lay.ep


@pytest.mark.parametrize("placement", ["contiguous", "round_robin"])
def test_owner_formula(placement: str) -> None:
    """contiguous: expert e on rank e // (E/ep); round_robin: on rank e % ep (E=12, ep=3)."""
    lay = Layout.of(ParallelismConfig(dp=3, ep=3, placement=placement), 12)  # type: ignore[arg-type]
    expected = (
        [e // 4 for e in range(12)] if placement == "contiguous" else [e % 3 for e in range(12)]
    )
    assert lay.owner.tolist() == expected
