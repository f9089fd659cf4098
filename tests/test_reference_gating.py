"""Router pieces of the reference layer: scoring, selections, weights, noise and aux metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.reference.experts import ExpertWeights, ffn, init_experts
from moesim.reference.functional import gelu, logsumexp, sigmoid, softmax, softplus
from moesim.reference.gating import (
    combine_weights,
    expert_choice,
    gate_logits,
    group_limited_ranking,
    hash_ranking,
    random_hash_table,
    rank_experts,
    score,
    selection_scores,
)
from moesim.reference.metrics import load_balancing_loss, router_entropy, z_loss

# ------------------------------------------------------------------------- functional


def test_softmax_sigmoid_softplus_hand_values() -> None:
    """softmax, sigmoid, softplus and logsumexp equal their closed forms, stably."""
    z = np.array([[0.0, math.log(3.0)]])
    np.testing.assert_allclose(softmax(z), [[0.25, 0.75]], atol=1e-15)
    np.testing.assert_allclose(logsumexp(z), [math.log(4.0)], atol=1e-15)
    np.testing.assert_allclose(sigmoid(np.array([0.0, math.log(3.0)])), [0.5, 0.75], atol=1e-15)
    np.testing.assert_allclose(softplus(np.array([0.0])), [math.log(2.0)], atol=1e-15)
    big = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    assert np.isfinite(softmax(big)).all() and np.isfinite(sigmoid(big)).all()
    np.testing.assert_allclose(sigmoid(np.array([-800.0, 800.0])), [0.0, 1.0], atol=1e-300)


def test_gelu_tanh_form_close_to_exact() -> None:
    """The tanh GeLU is within 1e-3 of the exact x * Phi(x)."""
    xs = np.linspace(-6, 6, 121)
    exact = np.array([0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in xs])
    assert np.abs(gelu(xs) - exact).max() < 1e-3


# --------------------------------------------------------------------------- experts


def test_expert_ffn_gated_and_plain_closed_form() -> None:
    """Gated experts compute down(act(x Wg) * (x Wu)); plain ones down(act(x Wu))."""
    x = np.array([[1.0, -2.0]])
    w_up = np.array([[[1.0], [0.0]]])  # x @ up = 1
    w_gate = np.array([[[0.0], [-1.0]]])  # x @ gate = 2
    w_down = np.array([[[3.0, 1.0]]])
    silu2 = 2.0 / (1.0 + math.exp(-2.0))
    gated = ExpertWeights(w_up, w_down, w_gate, "swiglu")
    np.testing.assert_allclose(ffn(gated, 0, x), [[3 * silu2, silu2]], atol=1e-15)
    relu = ExpertWeights(-w_up, w_down, None, "relu")  # relu(-1) = 0
    np.testing.assert_allclose(ffn(relu, 0, x), [[0.0, 0.0]])
    with pytest.raises(ValueError):
        ExpertWeights(w_up, w_down, None, "geglu")


def test_init_experts_shapes_dtype_and_seed() -> None:
    """init_experts gives (n,d,f)/(n,f,d) weights in the dtype, reproducibly from the seed."""
    a = init_experts(np.random.default_rng(3), 4, 8, 6, "geglu", np.float32)
    b = init_experts(np.random.default_rng(3), 4, 8, 6, "geglu", np.float32)
    assert a.w_up.shape == (4, 8, 6) and a.w_down.shape == (4, 6, 8)
    assert a.w_gate is not None and a.w_up.dtype == np.float32
    assert np.array_equal(a.w_down, b.w_down)
    assert init_experts(np.random.default_rng(3), 4, 8, 6, "gelu").w_gate is None


# ---------------------------------------------------------------------------- gating


def test_rank_experts_orders_best_first_ties_to_lower_index() -> None:
    """Ranking sorts experts by score descending; equal scores go to the lower index."""
    sel = np.array([[0.1, 0.5, 0.5, 0.2], [0.4, 0.3, 0.2, 0.1]])
    assert rank_experts(sel).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]
    assert rank_experts(sel, 2).tolist() == [[1, 2], [0, 1]]


def test_selection_bias_changes_choice_not_scores() -> None:
    """A per-expert bias reorders selection (DeepSeek-V3) but leaves router scores intact."""
    probs = score(np.array([[2.0, 1.0, 0.0, -1.0]]), "sigmoid")
    bias = np.array([0.0, 0.0, 0.5, 0.0])
    sel = selection_scores(probs, bias)
    assert rank_experts(sel, 2).tolist() == [[2, 0]]
    assert rank_experts(probs, 2).tolist() == [[0, 1]]
    np.testing.assert_array_equal(probs, score(np.array([[2.0, 1.0, 0.0, -1.0]]), "sigmoid"))


def test_group_limited_hand_case() -> None:
    """Top-2-sum group scores pick groups 1 then 0; expert 4 (2nd best overall) is excluded."""
    sel = np.array([[0.9, 0.0, 0.5, 0.5, 0.8, 0.1, 0.3, 0.3]])
    ranking, groups = group_limited_ranking(sel, expert_groups=4, topk_groups=2)
    # group scores: g0 .9, g1 1.0, g2 .9, g3 .6 -> g1, then g0 (tie with g2 -> lower index)
    assert groups.tolist() == [[1, 0]]
    assert ranking.tolist() == [[0, 2, 3, 1]]
    # DeepSeek-V2 style (group max): g0 .9, g2 .8 chosen
    ranking1, groups1 = group_limited_ranking(sel, 4, 2, group_top=1)
    assert groups1.tolist() == [[0, 2]]
    assert ranking1.tolist() == [[0, 4, 5, 1]]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tokens=st.integers(1, 12),
    groups=st.integers(1, 4),
    size=st.integers(1, 4),
    data=st.data(),
)
def test_group_limited_ranking_stays_in_best_groups(
    seed: int, tokens: int, groups: int, size: int, data: st.DataObject
) -> None:
    """Every ranked expert lies in one of the topk_groups groups with the best top-2 sums."""
    topk_groups = data.draw(st.integers(1, groups))
    sel = np.random.default_rng(seed).random((tokens, groups * size))
    ranking, _ = group_limited_ranking(sel, groups, topk_groups)
    assert ranking.shape == (tokens, topk_groups * size)
    for t in range(tokens):
        gscore = [sum(sorted(sel[t, g * size : (g + 1) * size])[-2:]) for g in range(groups)]
        best = sorted(range(groups), key=lambda g: -gscore[g])[:topk_groups]
        assert {int(e) // size for e in ranking[t]} == set(best)
        assert list(sel[t, ranking[t]]) == sorted(sel[t, ranking[t]], reverse=True)


def test_expert_choice_hand_case() -> None:
    """Each expert takes its top-capacity tokens by probability; a token may get 0..E experts."""
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    table = expert_choice(probs, capacity=2)
    # expert 0 takes tokens 0 (.9) and 1 (.6); expert 1 takes 3 (.8) and 2 (.5)
    assert table.tolist() == [[0, -1], [0, -1], [-1, 1], [-1, 1]]
    # capacity above T is clamped to T: every expert takes every token
    assert (expert_choice(probs, capacity=9) >= 0).all()


def test_hash_ranking_modulo_and_table() -> None:
    """Modulo hashing gives (id + j) % E; a seeded table gives fixed per-id permutations."""
    assert hash_ranking(np.array([0, 5, 7]), 3).tolist() == [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    t1 = random_hash_table(10, 4, np.random.default_rng(7))
    t2 = random_hash_table(10, 4, np.random.default_rng(7))
    assert np.array_equal(t1, t2)
    assert (np.sort(t1, axis=1) == np.arange(4)).all()
    assert hash_ranking(np.array([3, 3, 9]), 4, t1).tolist() == [
        t1[3].tolist(),
        t1[3].tolist(),
        t1[9].tolist(),
    ]


def test_noisy_gating_closed_form() -> None:
    """Noisy logits = x Wg + z * softplus(x Wn), z from the caller's generator."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 3))
    wg, wn = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    noisy = gate_logits(x, wg, wn, np.random.default_rng(42))
    z = np.random.default_rng(42).standard_normal((5, 4))
    np.testing.assert_allclose(noisy, x @ wg + z * np.log1p(np.exp(x @ wn)), atol=1e-12)
    np.testing.assert_array_equal(gate_logits(x, wg), x @ wg)
    with pytest.raises(ValueError):
        gate_logits(x, wg, wn, None)


def test_combine_weights_drop_renormalize_and_reroute() -> None:
    """Kept slots weigh their processing expert's prob (/ top-k sum if renormalized); drops 0."""
    probs = np.array([[0.5, 0.3, 0.2]])
    ranking = np.array([[0, 1, 2]])
    expert = np.array([[-1, 2]])  # first choice dropped, second rerouted to expert 2
    plain = combine_weights(probs, ranking, expert, 2, renormalize=False)
    np.testing.assert_allclose(plain, [[0.0, 0.2]])
    renorm = combine_weights(probs, ranking, expert, 2, renormalize=True, scale=2.0)
    np.testing.assert_allclose(renorm, [[0.0, 2.0 * 0.2 / 0.8]])


# --------------------------------------------------------------------------- metrics


def test_load_balancing_loss_uniform_is_one() -> None:
    """Perfectly uniform routing (f_i = P_i = 1/N) gives exactly 1.0."""
    n = 4
    p = 0.7
    probs = np.full((n, n), (1 - p) / (n - 1))
    np.fill_diagonal(probs, p)  # token t prefers expert t: f_i = 1/N, P_i = 1/N
    assert load_balancing_loss(probs, np.arange(n)) == pytest.approx(1.0, abs=1e-12)
    assert load_balancing_loss(np.full((8, n), 1 / n), np.arange(8) % n) == pytest.approx(1.0)


def test_load_balancing_loss_increases_with_skew() -> None:
    """Concentrating tokens on expert 0 with probability a gives N*a, increasing in a."""
    n, tokens = 4, 6
    losses = []
    for a in (0.25, 0.4, 0.6, 0.8, 0.99):
        probs = np.tile([a] + [(1 - a) / (n - 1)] * (n - 1), (tokens, 1))
        loss = load_balancing_loss(probs, np.zeros(tokens, dtype=np.int64))
        assert loss == pytest.approx(n * a)
        losses.append(loss)
    assert losses == sorted(losses) and losses[-1] > 1.0


def test_z_loss_closed_form() -> None:
    """z-loss of logits [[0,0],[ln3,0]] is mean(ln2^2, ln4^2) = 2.5 ln(2)^2."""
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits) == pytest.approx(2.5 * math.log(2.0) ** 2, abs=1e-14)


def test_router_entropy_uniform_and_one_hot() -> None:
    """Entropy is ln(E) for uniform probs, 0 for one-hot, and averages over tokens."""
    assert router_entropy(np.full((3, 8), 1 / 8)) == pytest.approx(math.log(8))
    assert router_entropy(np.eye(4)) == 0.0
    mixed = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert router_entropy(mixed) == pytest.approx(math.log(2) / 2)
