"""The reference MoE layer: hand-computed routing, gather/scatter vs dense, capacity semantics."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.model import ModelConfig
from moesim.reference import (
    ReferenceLayer,
    RouterKind,
    RoutingSpec,
    build_plan,
    dense_forward,
    forward,
    route,
)
from moesim.reference.experts import ffn
from moesim.routing.assignment import Overflow, Priority, assign, capacity_for

KINDS: list[RouterKind] = ["topk", "switch", "group_limited", "expert_choice", "hash"]
OVERFLOWS: list[Overflow] = ["drop", "reroute", "dropless"]
PRIORITIES: list[Priority] = ["token_order", "probability"]


def logit_layer(experts: int, top_k: int, **kw: Any) -> ReferenceLayer:
    """A layer whose router is the identity, so that x *is* the logits (d_model = E)."""
    layer = ReferenceLayer.random(
        np.random.default_rng(0), d_model=experts, d_ff=4, experts=experts, top_k=top_k, **kw
    )
    return dataclasses.replace(layer, w_router=np.eye(experts))


# Switch (top-1) case: 4 tokens, 3 experts, cf 0.75 -> capacity ceil(0.75*4*1/3) = 1.
# preferences: t0 0>1>2, t1 0>2>1, t2 1>2>0, t3 0>1>2 (t3 the most confident on expert 0)
SWITCH_LOGITS = np.array([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [5.0, 1.0, 0.0]])
SWITCH_CASES = [
    # token order: e0 <- t0, e1 <- t2; t1 and t3 drop
    ("drop", "token_order", [0, -1, 1, -1], [1, 1, 0]),
    # probability: e0 <- t3 (.976) ahead of t0 (.844) and t1 (.665)
    ("drop", "probability", [-1, -1, 1, 0], [1, 1, 0]),
    # round 2: t1 -> e2 (free), t3 -> e1 (full); round 3: t3 -> e2 (now full): dropped
    ("reroute", "token_order", [0, 2, 1, -1], [1, 1, 1]),
    # round 1 keeps t3 on e0, t2 on e1; t1 -> e2 in round 2; t0 finds e1, e2 full
    ("reroute", "probability", [-1, 2, 1, 0], [1, 1, 1]),
    ("dropless", "token_order", [0, 0, 1, 0], [3, 1, 0]),
]


@pytest.mark.parametrize(("overflow", "priority", "expected", "counts"), SWITCH_CASES)
def test_switch_hand_cases(
    overflow: str, priority: str, expected: list[int], counts: list[int]
) -> None:
    """Switch top-1, capacity 1: the assignment written out by hand for each policy."""
    layer = logit_layer(3, top_k=2)  # switch ignores the layer's top_k
    spec = RoutingSpec("switch", 0.75, overflow, priority)  # type: ignore[arg-type]
    r = route(layer, SWITCH_LOGITS, spec)
    assert r.capacity == (None if overflow == "dropless" else 1)
    assert r.expert[:, 0].tolist() == expected
    assert r.counts.tolist() == counts
    assert r.dropped_slots == expected.count(-1)
    p = np.exp(SWITCH_LOGITS) / np.exp(SWITCH_LOGITS).sum(axis=1, keepdims=True)
    want = [p[t, e] if e >= 0 else 0.0 for t, e in enumerate(expected)]
    np.testing.assert_allclose(r.weight[:, 0], want, atol=1e-15)


# Top-2 case: 4 tokens all preferring 0 > 1 > 2 with growing confidence; cf 1.0 ->
# capacity ceil(1*4*2/3) = 3. Probabilities (softmax): t0 .506/.307/.186,
# t1 .665/.245/.090, t2 .844/.114/.042, t3 .936/.047/.017.
TOPK_LOGITS = np.array([[1.0, 0.5, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [4.0, 1.0, 0.0]])
TOPK_CASES = [
    # first choices t0,t1,t2 fill e0; t3 drops; second choices t0,t1,t2 fill e1; t3 drops
    ("drop", "token_order", [[0, 1], [0, 1], [0, 1], [-1, -1]], [3, 3, 0], 1),
    # by probability e0 keeps t3,t2,t1 and drops t0; e1 keeps t0,t1,t2 and drops t3
    ("drop", "probability", [[-1, 1], [0, 1], [0, 1], [0, -1]], [3, 3, 0], 0),
    # t3's first slot moves to its 3rd expert (e2); its second slot has nothing left
    ("reroute", "token_order", [[0, 1], [0, 1], [0, 1], [2, -1]], [3, 3, 1], 0),
    # t0's first slot and t3's second both move to e2
    ("reroute", "probability", [[2, 1], [0, 1], [0, 1], [0, 2]], [3, 3, 2], 0),
    ("dropless", "probability", [[0, 1]] * 4, [4, 4, 0], 0),
]


@pytest.mark.parametrize(("overflow", "priority", "expected", "counts", "lost"), TOPK_CASES)
def test_topk_hand_cases(
    overflow: str, priority: str, expected: list[list[int]], counts: list[int], lost: int
) -> None:
    """Softmax top-2, capacity 3: the assignment written out by hand for each policy."""
    layer = logit_layer(3, top_k=2)
    spec = RoutingSpec("topk", 1.0, overflow, priority)  # type: ignore[arg-type]
    r = route(layer, TOPK_LOGITS, spec)
    assert r.capacity == (None if overflow == "dropless" else 3)
    assert r.expert.tolist() == expected
    assert r.counts.tolist() == counts
    assert r.dropped_tokens == lost
    out = forward(layer, TOPK_LOGITS, spec)
    assert out.aux.dropped_slots == sum(row.count(-1) for row in expected)
    if lost:  # a fully dropped token gets exactly zero MoE output (no shared experts)
        assert np.all(out.y[3] == 0.0)


def test_topk_weights_plain_and_renormalized() -> None:
    """Softmax weights are the selected probs; renormalize divides by the top-k sum (Mixtral)."""
    layer = logit_layer(3, top_k=2)
    p = np.exp(TOPK_LOGITS[1]) / np.exp(TOPK_LOGITS[1]).sum()
    plain = route(layer, TOPK_LOGITS, RoutingSpec("topk"))
    np.testing.assert_allclose(plain.weight[1], [p[0], p[1]], atol=1e-15)
    renorm = route(layer, TOPK_LOGITS, RoutingSpec("topk", renormalize=True))
    np.testing.assert_allclose(renorm.weight[1], [p[0], p[1]] / (p[0] + p[1]), atol=1e-15)
    np.testing.assert_allclose(renorm.weight.sum(axis=1), 1.0, atol=1e-15)


def test_sigmoid_bias_selects_but_does_not_weigh() -> None:
    """DeepSeek-V3: bias moves expert 2 into the top-2; weights are normalized raw sigmoids."""
    layer = logit_layer(4, top_k=2, router="sigmoid", expert_bias=True)
    layer = dataclasses.replace(layer, expert_bias=np.array([0.0, 0.0, 0.5, 0.0]))
    x = np.array([[2.0, 1.0, 0.0, -1.0]])
    r = route(layer, x, RoutingSpec("topk", scale=2.5))
    s = 1 / (1 + np.exp(-x[0]))  # .881 .731 .5 .269; +bias -> .881 .731 1.0 .269
    assert r.expert.tolist() == [[2, 0]]
    np.testing.assert_allclose(r.weight[0], 2.5 * np.array([s[2], s[0]]) / (s[2] + s[0]))
    np.testing.assert_allclose(r.scores[0], [s[2], s[0]])  # assign sees unbiased probs


def test_group_limited_layer_hand_case() -> None:
    """Group-limited top-2 picks experts 0 and 2, not expert 4 from an unchosen group."""
    layer = logit_layer(8, top_k=2, router="sigmoid", expert_groups=4, topk_groups=2)
    sel = np.array([[0.9, 0.0, 0.5, 0.5, 0.8, 0.1, 0.3, 0.3]])
    logits = np.log(sel + 1e-12) - np.log1p(-sel)  # sigmoid(logits) = sel
    r = route(layer, logits, RoutingSpec("group_limited", overflow="reroute"))
    assert r.expert.tolist() == [[0, 2]]
    assert r.ranking.tolist() == [[0, 2, 3, 1]]  # the reroute ranking excludes groups 2, 3


def test_expert_choice_layer_hand_case() -> None:
    """Expert choice, cf 1, k 1, 4 tokens, 2 experts: capacity 2, each expert its top 2."""
    layer = logit_layer(2, top_k=1)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    out = forward(layer, np.log(probs), RoutingSpec("expert_choice"))
    assert out.route.capacity == 2
    assert out.route.expert.tolist() == [[0, -1], [0, -1], [-1, 1], [-1, 1]]
    np.testing.assert_allclose(out.route.weight, np.where(out.route.expert >= 0, probs, 0))
    assert out.aux.dropped_slots == 0 and out.aux.dropped_tokens == 0


def test_hash_layer_hand_case() -> None:
    """Hash routing sends token id i to expert i % E, weight 1 (top-1), ignoring x."""
    layer = logit_layer(3, top_k=1)
    ids = np.array([4, 0, 2, 7])
    out = forward(layer, TOPK_LOGITS, RoutingSpec("hash"), token_ids=ids)
    assert out.route.expert[:, 0].tolist() == [1, 0, 2, 1]
    np.testing.assert_array_equal(out.route.weight, 1.0)
    want = np.stack(
        [ffn(layer.routed, e, TOPK_LOGITS[t : t + 1])[0] for t, e in enumerate([1, 0, 2, 1])]
    )
    np.testing.assert_allclose(out.y, want, atol=1e-14)
    assert out.aux.load_balancing_loss == pytest.approx(1.0)  # no gate: uniform probs
    assert out.aux.entropy == pytest.approx(math.log(3))
    with pytest.raises(ValueError):
        route(layer, TOPK_LOGITS, RoutingSpec("hash"))


def test_aux_metrics_of_forward() -> None:
    """forward's aux: z-loss closed form on explicit logits, load = counts, entropy bounds."""
    layer = logit_layer(2, top_k=1)
    x = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = forward(layer, x, RoutingSpec("switch"))
    assert out.aux.z_loss == pytest.approx(2.5 * math.log(2.0) ** 2)
    assert out.aux.load.tolist() == [2, 0]
    # f = (1, 0), P = (mean(.5, .75), .) -> loss = 2 * 0.625
    assert out.aux.load_balancing_loss == pytest.approx(1.25)
    assert 0 < out.aux.entropy < math.log(2)


# ------------------------------------------------------------------ property checks


@st.composite
def cases(draw: st.DrawFn) -> tuple[ReferenceLayer, np.ndarray, RoutingSpec, np.ndarray]:
    """A random small layer, input, routing spec and token ids."""
    kind: RouterKind = draw(st.sampled_from(KINDS))
    groups = draw(st.integers(1, 3))
    size = draw(st.integers(1, 3))
    experts = groups * size if kind == "group_limited" else draw(st.integers(2, 8))
    topk_groups = draw(st.integers(1, groups)) if kind == "group_limited" else None
    reach = topk_groups * size if topk_groups else experts
    top_k = draw(st.integers(1, min(3, reach)))
    seed = draw(st.integers(0, 2**32 - 1))
    layer = ReferenceLayer.random(
        np.random.default_rng(seed),
        d_model=draw(st.integers(8, 24)),
        d_ff=draw(st.integers(2, 12)),
        experts=experts,
        top_k=top_k,
        activation=draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu"])),
        shared_experts=draw(st.integers(0, 2)),
        router=draw(st.sampled_from(["softmax", "sigmoid"])),
        expert_groups=groups if kind == "group_limited" else None,
        topk_groups=topk_groups,
    )
    tokens = draw(st.integers(1, 20))
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((tokens, layer.d_model))
    spec = RoutingSpec(
        kind,
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.25, 2.0])),
        overflow=draw(st.sampled_from(OVERFLOWS)),
        priority=draw(st.sampled_from(PRIORITIES)),
        renormalize=draw(st.sampled_from([None, True, False])),
    )
    return layer, x, spec, rng.integers(0, 1000, size=tokens)


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_gather_scatter_matches_dense(
    case: tuple[ReferenceLayer, np.ndarray, RoutingSpec, np.ndarray],
) -> None:
    """The gather/expert/scatter output equals every-expert-on-every-token masked (1e-10)."""
    layer, x, spec, ids = case
    out = forward(layer, x, spec, token_ids=ids)
    np.testing.assert_allclose(out.y, dense_forward(layer, x, out.route), rtol=0, atol=1e-10)
    res = forward(layer, x, spec, token_ids=ids, residual=True)
    np.testing.assert_array_equal(res.y, out.y + x)


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_capacity_conservation_and_assign_agreement(
    case: tuple[ReferenceLayer, np.ndarray, RoutingSpec, np.ndarray],
) -> None:
    """processed + dropped == T*k, capacity holds, dropless never drops, counts == assign's."""
    layer, x, spec, ids = case
    out = forward(layer, x, spec, token_ids=ids)
    r, tokens = out.route, x.shape[0]
    np.testing.assert_array_equal(out.plan.counts, r.counts)
    np.testing.assert_array_equal(out.aux.load, r.counts)
    if spec.kind == "expert_choice":
        return
    k = r.top_k
    assert int(r.counts.sum()) + out.aux.dropped_slots == tokens * k
    if spec.overflow == "dropless" or spec.capacity_factor is None:
        assert out.aux.dropped_slots == 0 and r.capacity is None
    else:
        cap = capacity_for(tokens, k, layer.experts, spec.capacity_factor)
        assert r.capacity == cap and cap is not None
        assert int(r.counts.max()) <= cap
    # the simulator's path (moesim.engine.moe_layer): capacity_for, None when dropless,
    # then assign on the same ranking and scores
    cap = capacity_for(tokens, k, layer.experts, spec.capacity_factor)
    if spec.overflow == "dropless":
        cap = None
    a = assign(r.ranking, k, layer.experts, cap, spec.overflow, spec.priority, r.scores)
    np.testing.assert_array_equal(r.counts, a.counts)
    np.testing.assert_array_equal(r.expert, a.expert)
    assert out.aux.dropped_slots == a.dropped
    assert out.aux.rerouted == a.rerouted(r.ranking)
    assert out.aux.dropped_tokens == int((a.expert < 0).all(axis=1).sum())


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tokens=st.integers(1, 40),
    experts=st.integers(2, 8),
    overflow=st.sampled_from(OVERFLOWS),
    priority=st.sampled_from(PRIORITIES),
    cf=st.sampled_from([None, 0.5, 1.0, 1.5]),
)
def test_simulator_routing_path_agrees(
    seed: int, tokens: int, experts: int, overflow: str, priority: str, cf: float | None
) -> None:
    """Ranking from the probs (as the engine ranks), capacity_for + assign: same counts/drops."""
    layer = ReferenceLayer.random(
        np.random.default_rng(seed), d_model=8, d_ff=4, experts=experts, top_k=2
    )
    x = np.random.default_rng(seed + 1).standard_normal((tokens, 8))
    spec = RoutingSpec("topk", cf, overflow, priority)  # type: ignore[arg-type]
    out = forward(layer, x, spec)
    probs = out.route.probs
    depth = experts if overflow == "reroute" else 2
    rk = np.argsort(-probs, axis=1, kind="stable")[:, :depth].astype(np.int32)
    sc = np.take_along_axis(probs, rk.astype(np.int64), axis=1)
    cap = capacity_for(tokens, 2, experts, cf)
    if overflow == "dropless":
        cap = None
    a = assign(rk, 2, experts, cap, overflow, priority, sc)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out.aux.load, a.counts)
    assert out.aux.dropped_slots == a.dropped


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tokens=st.integers(1, 40),
    experts=st.integers(1, 8),
    data=st.data(),
    cf=st.sampled_from([None, 0.25, 0.5, 1.0, 2.0, 3.0]),
)
def test_expert_choice_fills_capacity_exactly(
    seed: int, tokens: int, experts: int, data: st.DataObject, cf: float | None
) -> None:
    """Expert choice: every expert processes exactly min(capacity, T) distinct tokens."""
    top_k = data.draw(st.integers(1, experts))
    layer = ReferenceLayer.random(
        np.random.default_rng(seed), d_model=8, d_ff=4, experts=experts, top_k=top_k
    )
    x = np.random.default_rng(seed + 1).standard_normal((tokens, 8))
    r = route(layer, x, RoutingSpec("expert_choice", capacity_factor=cf))
    cap = capacity_for(tokens, top_k, experts, 1.0 if cf is None else cf)
    assert cap is not None and r.capacity == cap
    np.testing.assert_array_equal(r.counts, np.full(experts, min(cap, tokens)))
    if tokens >= cap:
        assert (r.counts == cap).all()


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    tokens=st.integers(1, 16),
    overflow=st.sampled_from(OVERFLOWS),
    cf=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_group_limited_never_leaves_chosen_groups(
    seed: int, tokens: int, overflow: str, cf: float
) -> None:
    """Under every policy, each processed slot's expert is in one of its token's top groups."""
    groups, size, topk_groups = 4, 2, 2
    layer = ReferenceLayer.random(
        np.random.default_rng(seed),
        d_model=8,
        d_ff=4,
        experts=groups * size,
        top_k=3,
        router="sigmoid",
        expert_bias=True,
        expert_groups=groups,
        topk_groups=topk_groups,
    )
    bias = np.random.default_rng(seed + 2).normal(0, 0.2, groups * size)
    layer = dataclasses.replace(layer, expert_bias=bias)
    x = np.random.default_rng(seed + 1).standard_normal((tokens, 8))
    spec = RoutingSpec("group_limited", cf, overflow)  # type: ignore[arg-type]
    r = route(layer, x, spec)
    sel = 1 / (1 + np.exp(-(x @ layer.w_router))) + bias
    for t in range(tokens):
        gscore = [sum(sorted(sel[t, g * size : (g + 1) * size])[-2:]) for g in range(groups)]
        best = set(sorted(range(groups), key=lambda g: -gscore[g])[:topk_groups])
        kept = r.expert[t][r.expert[t] >= 0]
        assert {int(e) // size for e in kept} <= best


def test_same_seed_same_outputs() -> None:
    """Same seeds (weights and router noise) give identical outputs; another noise seed differs."""

    def run(noise_seed: int) -> np.ndarray:
        layer = ReferenceLayer.random(
            np.random.default_rng(5), d_model=16, d_ff=8, experts=6, top_k=2, noisy=True,
            shared_experts=1, shared_gate=True,
        )  # fmt: skip
        x = np.random.default_rng(6).standard_normal((12, 16))
        spec = RoutingSpec("topk", 1.0, "reroute", noise=True)
        return forward(layer, x, spec, rng=np.random.default_rng(noise_seed)).y

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_noise_needs_generator_and_noisy_layer() -> None:
    """Noisy routing refuses to run without a generator or a noise projection."""
    plain = ReferenceLayer.random(np.random.default_rng(0), d_model=8, d_ff=4, experts=4, top_k=1)
    noisy = ReferenceLayer.random(
        np.random.default_rng(0), d_model=8, d_ff=4, experts=4, top_k=1, noisy=True
    )
    x = np.ones((3, 8))
    with pytest.raises(ValueError):
        route(plain, x, RoutingSpec(noise=True), rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        route(noisy, x, RoutingSpec(noise=True))


def test_float32_layer_matches_float64() -> None:
    """A float32 layer computes in float32 and agrees with the float64 one to ~1e-5."""
    kw = dict(d_model=32, d_ff=16, experts=4, top_k=2, activation="geglu", shared_experts=1)
    l64 = ReferenceLayer.random(np.random.default_rng(9), **kw)  # type: ignore[arg-type]
    l32 = ReferenceLayer.random(np.random.default_rng(9), dtype=np.float32, **kw)  # type: ignore[arg-type]
    x = np.random.default_rng(1).standard_normal((10, 32))
    spec = RoutingSpec("topk", 2.0)
    y32, y64 = forward(l32, x, spec), forward(l64, x, spec)
    assert y32.y.dtype == np.float32 and y32.route.probs.dtype == np.float32
    np.testing.assert_array_equal(y32.route.expert, y64.route.expert)
    np.testing.assert_allclose(y32.y, y64.y, atol=1e-4)


def test_from_model_config() -> None:
    """from_model takes routing shape from a ModelConfig and shrinks the widths on request."""
    model = ModelConfig(
        name="tiny-v3",
        source="test",
        layers=2,
        d_model=4096,
        vocab_size=100,
        tied_embeddings=False,
        experts=8,
        top_k=2,
        expert_d_ff=2048,
        shared_experts=1,
        activation="swiglu",
        router="sigmoid",
        expert_bias=True,
        expert_groups=4,
        topk_groups=2,
        attention="mha",
        heads=4,
    )
    layer = ReferenceLayer.from_model(model, np.random.default_rng(0), d_model=16, d_ff=8)
    assert (layer.d_model, layer.experts, layer.top_k, layer.router) == (16, 8, 2, "sigmoid")
    assert layer.routed.w_gate is not None and layer.routed.d_ff == 8
    assert layer.shared is not None and layer.shared.n == 1 and layer.shared.d_ff == 8
    assert layer.expert_bias is not None and (layer.expert_groups, layer.topk_groups) == (4, 2)
    x = np.random.default_rng(1).standard_normal((6, 16))
    out = forward(layer, x, RoutingSpec("group_limited", 1.0, "reroute"))
    np.testing.assert_allclose(out.y, dense_forward(layer, x, out.route), atol=1e-10)


def test_build_plan_index_arrays() -> None:
    """The plan sorts kept slots by expert (token order within), with offsets per expert."""
    expert = np.array([[2, 0], [-1, 2], [0, 1]])
    weight = np.array([[0.1, 0.2], [0.0, 0.4], [0.5, 0.6]])
    plan = build_plan(expert, weight, 4)
    assert plan.token_index.tolist() == [0, 2, 2, 0, 1]
    assert plan.slot_index.tolist() == [1, 0, 1, 0, 1]
    assert plan.weight.tolist() == [0.2, 0.5, 0.6, 0.1, 0.4]
    assert plan.offsets.tolist() == [0, 2, 3, 5, 5]
    assert plan.counts.tolist() == [2, 1, 2, 0]
