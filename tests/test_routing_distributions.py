"""Expert popularity and sampled token choices (moesim.routing.distributions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.routing import DirichletRouting, HotRouting, UniformRouting, ZipfRouting
from moesim.rng import stream
from moesim.routing.distributions import popularity, sample_choices

CONFIGS = [
    UniformRouting(kind="uniform"),
    ZipfRouting(kind="zipf", s=1.2),
    ZipfRouting(kind="zipf", s=0.0),
    DirichletRouting(kind="dirichlet", alpha=0.3),
    HotRouting(kind="hot", hot_fraction=0.25, hot_share=0.6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}")
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("experts", [1, 2, 7, 64])
def test_popularity_is_a_distribution(cfg, permute: bool, experts: int) -> None:
    """Popularity has one non-negative entry per expert and sums to 1, for every kind."""
    cfg = cfg.model_copy(update={"permute": permute})
    p = popularity(cfg, experts, stream(1, "popularity"))
    assert p.shape == (experts,)
    assert (p >= 0).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_zipf_zero_equals_uniform() -> None:
    """Zipf with s = 0 is exactly the uniform distribution."""
    p = popularity(ZipfRouting(kind="zipf", s=0.0), 16, stream(0, "p"))
    np.testing.assert_allclose(p, np.full(16, 1 / 16), rtol=1e-12)


def test_zipf_weights_follow_the_power_law() -> None:
    """Zipf(s): expert of rank r has weight r**-s, expert 0 hottest (no permutation)."""
    s, experts = 1.5, 10
    p = popularity(ZipfRouting(kind="zipf", s=s), experts, stream(0, "p"))
    harmonic = sum(r**-s for r in range(1, experts + 1))
    expected = [r**-s / harmonic for r in range(1, experts + 1)]
    np.testing.assert_allclose(p, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("experts", "fraction", "share", "n_hot"),
    [(8, 0.25, 0.6, 2), (64, 0.1, 0.5, 6), (10, 0.01, 0.3, 1), (4, 0.99, 0.9, 3), (2, 0.5, 0.7, 1)],
)
def test_hot_experts_get_hot_share(experts: int, fraction: float, share: float, n_hot: int) -> None:
    """The hot experts (round(fraction x E), at least 1, at most E-1) share hot_share equally."""
    cfg = HotRouting(kind="hot", hot_fraction=fraction, hot_share=share)
    p = popularity(cfg, experts, stream(0, "p"))
    np.testing.assert_allclose(p[:n_hot], share / n_hot, rtol=1e-12)
    np.testing.assert_allclose(p[n_hot:], (1 - share) / (experts - n_hot), rtol=1e-12)


def test_permute_is_a_permutation_of_the_unpermuted() -> None:
    """permute shuffles which experts are hot but keeps the multiset of probabilities."""
    cfg = ZipfRouting(kind="zipf", s=1.0)
    p = popularity(cfg, 32, stream(3, "p"))
    q = popularity(cfg.model_copy(update={"permute": True}), 32, stream(3, "p"))
    np.testing.assert_allclose(np.sort(q), np.sort(p), rtol=1e-12)
    assert not np.allclose(q, p)


def test_dirichlet_same_seed_same_popularity() -> None:
    """Dirichlet popularity is reproducible from the seed and varies with it."""
    cfg = DirichletRouting(kind="dirichlet", alpha=0.5)
    a = popularity(cfg, 16, stream(7, "popularity"))
    b = popularity(cfg, 16, stream(7, "popularity"))
    c = popularity(cfg, 16, stream(8, "popularity"))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@settings(max_examples=60, deadline=None)
@given(
    experts=st.integers(1, 40),
    tokens=st.integers(0, 50),
    depth=st.integers(1, 48),
    s=st.floats(0, 3),
    seed=st.integers(0, 2**31),
)
def test_sample_choices_shape_distinct_and_sorted(
    experts: int, tokens: int, depth: int, s: float, seed: int
) -> None:
    """Each row holds min(depth, E) distinct valid experts with non-increasing scores."""
    p = popularity(ZipfRouting(kind="zipf", s=s), experts, stream(0, "p"))
    ranking, scores = sample_choices(stream(seed, "routing"), p, tokens, depth)
    d = min(depth, experts)
    assert ranking.shape == scores.shape == (tokens, d)
    assert ranking.dtype == np.int32 and scores.dtype == np.float32
    assert ((ranking >= 0) & (ranking < experts)).all()
    for row in ranking:
        assert len(set(row.tolist())) == d
    assert (np.diff(scores, axis=1) <= 0).all()
    assert (scores >= 0).all() and (scores <= 1).all()
    if d == experts and tokens:
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_partial_depth_is_prefix_of_full_ranking() -> None:
    """With the same draws, the depth-k ranking is the first k entries of the full ranking."""
    p = popularity(ZipfRouting(kind="zipf", s=1.0), 12, stream(0, "p"))
    full, full_s = sample_choices(stream(5, "routing"), p, 500, 12)
    part, part_s = sample_choices(stream(5, "routing"), p, 500, 3)
    np.testing.assert_array_equal(part, full[:, :3])
    np.testing.assert_allclose(part_s, full_s[:, :3], rtol=1e-6)


def test_first_and_second_choice_frequencies() -> None:
    """First choices follow popularity; second choices follow Plackett-Luce (no replacement)."""
    experts, tokens = 6, 200_000
    p = popularity(ZipfRouting(kind="zipf", s=1.0), experts, stream(0, "p"))
    ranking, _ = sample_choices(stream(11, "routing"), p, tokens, 2)
    first = np.bincount(ranking[:, 0], minlength=experts) / tokens
    second = np.bincount(ranking[:, 1], minlength=experts) / tokens
    # P(second = e) = sum_{f != e} p_f * p_e / (1 - p_f)
    expected_second = np.array(
        [sum(p[f] * p[e] / (1 - p[f]) for f in range(experts) if f != e) for e in range(experts)]
    )
    # 5 standard deviations of a binomial proportion at 200k draws is at most ~0.0056
    tol = 5 * np.sqrt(0.25 / tokens)
    np.testing.assert_allclose(first, p, atol=tol)
    np.testing.assert_allclose(second, expected_second, atol=tol)
    # and the skew is real: expert 0 is chosen first clearly more often than expert 5
    assert first[0] > 3 * first[5]


def test_hot_routing_first_choice_share() -> None:
    """Under hot routing the hot experts receive about hot_share of first choices."""
    cfg = HotRouting(kind="hot", hot_fraction=0.25, hot_share=0.7)
    p = popularity(cfg, 16, stream(0, "p"))
    ranking, _ = sample_choices(stream(2, "routing"), p, 100_000, 1)
    share = np.isin(ranking[:, 0], [0, 1, 2, 3]).mean()
    assert share == pytest.approx(0.7, abs=0.01)


def test_same_seed_same_draws() -> None:
    """The same seed and purpose reproduce the draws; another seed or purpose changes them."""
    p = popularity(UniformRouting(kind="uniform"), 32, stream(0, "p"))
    a = sample_choices(stream(42, "routing", 3), p, 64, 4)
    b = sample_choices(stream(42, "routing", 3), p, 64, 4)
    c = sample_choices(stream(43, "routing", 3), p, 64, 4)
    d = sample_choices(stream(42, "arrivals", 3), p, 64, 4)
    e = sample_choices(stream(42, "routing", 4), p, 64, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (c, d, e):
        assert not np.array_equal(a[0], other[0])


def test_zero_popularity_expert_is_ranked_last() -> None:
    """An expert with zero popularity never comes before a positive-popularity expert."""
    p = np.array([0.5, 0.0, 0.3, 0.2])
    ranking, scores = sample_choices(stream(0, "routing"), p, 2000, 4)
    assert (ranking[:, :3] != 1).all()
    assert (ranking[:, 3] == 1).all()
    assert (scores[:, 3] == 0).all()
