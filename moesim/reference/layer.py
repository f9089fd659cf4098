"""A real MoE layer forward pass on numpy arrays: the ground truth for routing semantics.

``forward`` runs route -> capacity / overflow -> dispatch gather -> experts -> combine
scatter, plus shared experts; ``dense_forward`` runs every expert on every token and masks
the results with the same routing decision, and must agree with ``forward`` to float
tolerance.

Routing kinds (``RoutingSpec.kind``):

- ``topk``: token choice top-k with softmax or sigmoid scores (``ReferenceLayer.router``).
- ``switch``: top-1 (Switch Transformer), whatever the layer's ``top_k``.
- ``group_limited``: DeepSeek group-limited top-k over the layer's ``expert_groups`` /
  ``topk_groups``; experts outside the chosen groups are excluded from the ranking (see
  ``moesim.reference.gating``), so even a reroute stays inside them.
- ``expert_choice``: each expert takes its top ``capacity = ceil(cf * T * k / E)`` tokens
  (cf = ``capacity_factor``, 1.0 when None); every expert gets exactly ``min(capacity, T)``
  tokens, so exactly its capacity whenever ``T >= capacity``. There are no per-token slots,
  so ``overflow`` and ``priority`` do not apply, ``dropped_slots`` is 0, and
  ``dropped_tokens`` counts tokens no expert took. Weights are the softmax (or sigmoid)
  probabilities ``probs[t, e]``.
- ``hash``: experts from ``token_ids`` (``gating.hash_ranking``); there is no learned gate:
  the logits are zeros (uniform probabilities, which is what the aux metrics see) and each
  kept slot weighs 1/k.

Capacity and overflow for the token-choice kinds are *not* implemented here: the ranking and
scores are handed to ``moesim.routing.assignment.assign``, the single implementation shared
with the simulator, with per-expert capacity ``capacity_for(T, k, E, capacity_factor)``
(None when ``overflow="dropless"``). The ranking passed is each token's experts in
preference order, ``k`` deep, or as deep as the kind allows (all experts, or all experts of
the chosen groups) for ``overflow="reroute"``; the scores are the router probabilities in
the same order (no selection bias), which ``priority="probability"`` sorts by.

Combine weights: softmax probabilities of the processing experts, optionally renormalized
over the token's top-k (``renormalize=True``, Mixtral); sigmoid scores are always
normalized over the top-k unless ``renormalize=False`` is given (DeepSeek-V3); times
``scale`` (DeepSeek's ``routed_scaling_factor``). A dropped slot contributes zero.

Residual: the layer returns only the MoE output (routed + shared experts); a dropped token's
pass-through is the caller's residual connection. ``residual=True`` adds ``x`` for callers
who want the block's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from moesim.reference.dispatch import (
    DispatchPlan,
    build_plan,
    gather,
    run_experts,
    scatter_combine,
)
from moesim.reference.experts import Activation, ExpertWeights, every_expert, ffn, init_experts
from moesim.reference.functional import sigmoid
from moesim.reference.gating import (
    Scoring,
    combine_weights,
    expert_choice,
    gate_logits,
    group_limited_ranking,
    hash_ranking,
    rank_experts,
    score,
    selection_scores,
)
from moesim.reference.metrics import AuxMetrics, load_balancing_loss, router_entropy, z_loss
from moesim.routing.assignment import Assignment, Overflow, Priority, assign, capacity_for

RouterKind = Literal["topk", "switch", "group_limited", "expert_choice", "hash"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class ModelShape(Protocol):
    """The fields of ``moesim.config.model.ModelConfig`` a reference layer is built from."""

    @property
    def d_model(self) -> int: ...
    @property
    def experts(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def expert_d_ff(self) -> int: ...
    @property
    def shared_experts(self) -> int: ...
    @property
    def shared_d_ff(self) -> int: ...
    @property
    def shared_expert_gate(self) -> bool: ...
    @property
    def activation(self) -> Activation: ...
    @property
    def router(self) -> Scoring: ...
    @property
    def expert_bias(self) -> bool: ...
    @property
    def expert_groups(self) -> int | None: ...
    @property
    def topk_groups(self) -> int | None: ...


@dataclass(frozen=True, eq=False)
class ReferenceLayer:
    """The weights and routing shape of one MoE layer."""

    w_router: np.ndarray
    """(d_model, E) gate projection: logits = x @ w_router."""
    routed: ExpertWeights
    """The E routed experts."""
    top_k: int
    router: Scoring = "softmax"
    expert_bias: np.ndarray | None = None
    """(E,) bias added to scores for selection only (DeepSeek-V3), or None."""
    w_noise: np.ndarray | None = None
    """(d_model, E) noise projection of noisy top-k gating, or None."""
    shared: ExpertWeights | None = None
    """Shared experts, applied to every token and summed, or None."""
    w_shared_gate: np.ndarray | None = None
    """(d_model, 1): shared output scaled by sigmoid(x @ w) (Qwen2-MoE), or None."""
    expert_groups: int | None = None
    topk_groups: int | None = None

    def __post_init__(self) -> None:
        d, e = self.w_router.shape
        if self.routed.n != e or self.routed.d_model != d:
            raise ValueError(f"routed experts {self.routed.w_up.shape} do not match router {d}x{e}")
        if self.dtype not in _FLOATS:
            raise ValueError(f"dtype {self.dtype} is not float32 or float64")
        if not 1 <= self.top_k <= e:
            raise ValueError(f"top_k={self.top_k} not in 1..{e}")
        if self.expert_bias is not None and self.expert_bias.shape != (e,):
            raise ValueError(f"expert_bias shape {self.expert_bias.shape} != {(e,)}")
        if self.w_noise is not None and self.w_noise.shape != (d, e):
            raise ValueError(f"w_noise shape {self.w_noise.shape} != {(d, e)}")
        if self.shared is not None and self.shared.d_model != d:
            raise ValueError("shared experts have the wrong d_model")
        if self.w_shared_gate is not None and (
            self.shared is None or self.w_shared_gate.shape != (d, 1)
        ):
            raise ValueError("w_shared_gate needs shared experts and shape (d_model, 1)")
        if (self.expert_groups is None) != (self.topk_groups is None):
            raise ValueError("expert_groups and topk_groups must be set together")
        if self.expert_groups is not None and self.topk_groups is not None:
            if e % self.expert_groups or not 1 <= self.topk_groups <= self.expert_groups:
                raise ValueError(
                    f"bad groups: experts={e}, expert_groups={self.expert_groups}, "
                    f"topk_groups={self.topk_groups}"
                )
            if self.top_k > self.topk_groups * (e // self.expert_groups):
                raise ValueError(f"top_k={self.top_k} exceeds the experts of the chosen groups")

    @property
    def d_model(self) -> int:
        return int(self.w_router.shape[0])

    @property
    def experts(self) -> int:
        return int(self.w_router.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.w_router.dtype

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        *,
        d_model: int,
        d_ff: int,
        experts: int,
        top_k: int,
        activation: Activation = "swiglu",
        shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        router: Scoring = "softmax",
        expert_bias: bool = False,
        noisy: bool = False,
        expert_groups: int | None = None,
        topk_groups: int | None = None,
        dtype: type[np.floating] | np.dtype = np.float64,
    ) -> ReferenceLayer:
        """A layer with N(0, 1/fan_in) weights drawn from ``rng`` (same seed, same layer).

        Draw order: router, noise projection (if ``noisy``), routed experts, shared experts,
        shared gate. The selection bias starts at zero, as in DeepSeek-V3 (set another with
        ``dataclasses.replace``).
        """
        w_router = (rng.standard_normal((d_model, experts)) / np.sqrt(d_model)).astype(dtype)
        w_noise = (
            (rng.standard_normal((d_model, experts)) / np.sqrt(d_model)).astype(dtype)
            if noisy
            else None
        )
        routed = init_experts(rng, experts, d_model, d_ff, activation, dtype)
        shared = (
            init_experts(rng, shared_experts, d_model, shared_d_ff or d_ff, activation, dtype)
            if shared_experts
            else None
        )
        w_shared_gate = (
            (rng.standard_normal((d_model, 1)) / np.sqrt(d_model)).astype(dtype)
            if shared_gate and shared is not None
            else None
        )
        return cls(
            w_router=w_router,
            routed=routed,
            top_k=top_k,
            router=router,
            expert_bias=np.zeros(experts, dtype=dtype) if expert_bias else None,
            w_noise=w_noise,
            shared=shared,
            w_shared_gate=w_shared_gate,
            expert_groups=expert_groups,
            topk_groups=topk_groups,
        )

    @classmethod
    def from_model(
        cls,
        model: ModelShape,
        rng: np.random.Generator,
        *,
        d_model: int | None = None,
        d_ff: int | None = None,
        shared_d_ff: int | None = None,
        noisy: bool = False,
        dtype: type[np.floating] | np.dtype = np.float64,
    ) -> ReferenceLayer:
        """A random layer with a ModelConfig's routing shape, widths optionally shrunk.

        Experts, top-k, activation, scoring, selection bias, groups and shared experts come
        from ``model``; ``d_model`` / ``d_ff`` / ``shared_d_ff`` override the published
        widths (real widths are too large for tests); when ``d_ff`` is overridden and
        ``shared_d_ff`` is not, shared experts take ``d_ff`` too.
        """
        return cls.random(
            rng,
            d_model=d_model or model.d_model,
            d_ff=d_ff or model.expert_d_ff,
            experts=model.experts,
            top_k=model.top_k,
            activation=model.activation,
            shared_experts=model.shared_experts,
            shared_d_ff=shared_d_ff or (d_ff if d_ff is not None else model.shared_d_ff),
            shared_gate=model.shared_expert_gate,
            router=model.router,
            expert_bias=model.expert_bias,
            noisy=noisy,
            expert_groups=model.expert_groups,
            topk_groups=model.topk_groups,
            dtype=dtype,
        )


@dataclass(frozen=True, eq=False)
class RoutingSpec:
    """How a forward pass routes: kind, capacity, overflow policy and weighting."""

    kind: RouterKind = "topk"
    capacity_factor: float | None = None
    """Per-expert capacity = ceil(cf * T * k / E); None = unlimited (expert choice: 1.0)."""
    overflow: Overflow = "drop"
    priority: Priority = "token_order"
    renormalize: bool | None = None
    """Divide weights by the top-k probability sum; None = softmax no, sigmoid yes."""
    noise: bool = False
    """Add noisy top-k noise (needs a layer with ``w_noise`` and an ``rng``)."""
    group_top: int = 2
    """Group score = sum of a group's best ``group_top`` scores (DeepSeek-V3: 2)."""
    hash_table: np.ndarray | None = None
    """(vocab, E) per-id expert order for ``kind="hash"``; None = (id + j) % E."""
    scale: float = 1.0
    """Multiplier of the routed weights (DeepSeek ``routed_scaling_factor``)."""


@dataclass(frozen=True, eq=False)
class Route:
    """The routing decision of one forward pass."""

    kind: RouterKind
    top_k: int
    """Choices per token (1 for switch)."""
    logits: np.ndarray
    """(T x E) logits the router scored (noise included; zeros for hash)."""
    probs: np.ndarray
    """(T x E) router probabilities (softmax or sigmoid)."""
    ranking: np.ndarray
    """(T x depth) experts in preference order, as passed to ``assign`` (expert choice:
    every expert by probability, for metrics only)."""
    scores: np.ndarray
    """(T x depth) ``probs`` in ranking order, as passed to ``assign``."""
    capacity: int | None
    """Per-expert capacity applied (None = unlimited)."""
    expert: np.ndarray
    """int (T x w): expert processing slot (t, j), -1 if none. Token choice: w = k;
    expert choice: w = E and column e is e or -1."""
    weight: np.ndarray
    """(T x w) combine weight of each slot, 0 where ``expert`` is -1."""
    assignment: Assignment | None
    """The ``assign`` result (None for expert choice)."""

    @property
    def counts(self) -> np.ndarray:
        """int64 (E,): slots each expert processes."""
        kept = self.expert[self.expert >= 0].astype(np.int64)
        return np.bincount(kept, minlength=self.probs.shape[1])

    @property
    def dropped_slots(self) -> int:
        """Token-choice slots dropped by capacity (0 for expert choice)."""
        return 0 if self.assignment is None else int((self.expert < 0).sum())

    @property
    def dropped_tokens(self) -> int:
        """Tokens processed by no routed expert."""
        return int((self.expert < 0).all(axis=1).sum())

    @property
    def rerouted(self) -> int:
        """Slots processed by an expert other than their original choice."""
        return 0 if self.assignment is None else self.assignment.rerouted(self.ranking)


@dataclass(frozen=True, eq=False)
class LayerOutput:
    """What a forward pass returns."""

    y: np.ndarray
    """(T x d_model) MoE output (plus ``x`` when ``residual=True``)."""
    route: Route
    plan: DispatchPlan
    aux: AuxMetrics


def _input(layer: ReferenceLayer, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=layer.dtype)
    if x.ndim != 2 or x.shape[1] != layer.d_model:
        raise ValueError(f"x must be (tokens, {layer.d_model}), got {x.shape}")
    return x


def route(
    layer: ReferenceLayer,
    x: np.ndarray,
    spec: RoutingSpec | None = None,
    *,
    rng: np.random.Generator | None = None,
    token_ids: np.ndarray | None = None,
) -> Route:
    """Score, select, and apply capacity / overflow (via ``assign``) for tokens ``x``."""
    spec = spec or RoutingSpec()
    x = _input(layer, x)
    tokens, experts = x.shape[0], layer.experts
    k = 1 if spec.kind == "switch" else layer.top_k
    if spec.kind == "hash":
        if token_ids is None:
            raise ValueError("hash routing needs token_ids")
        if np.shape(token_ids) != (tokens,):
            raise ValueError(f"token_ids must have shape ({tokens},)")
        logits = np.zeros((tokens, experts), dtype=layer.dtype)
        probs = score(logits, "softmax")
        full = hash_ranking(token_ids, experts, spec.hash_table)
    else:
        if spec.noise and layer.w_noise is None:
            raise ValueError("noise=True needs a layer built with noisy=True")
        logits = gate_logits(x, layer.w_router, layer.w_noise if spec.noise else None, rng)
        probs = score(logits, layer.router)
        selection = selection_scores(probs, layer.expert_bias)
        if spec.kind == "group_limited":
            if layer.expert_groups is None or layer.topk_groups is None:
                raise ValueError("group_limited routing needs expert_groups and topk_groups")
            full, _ = group_limited_ranking(
                selection, layer.expert_groups, layer.topk_groups, spec.group_top
            )
        elif spec.kind in ("topk", "switch", "expert_choice"):
            full = rank_experts(selection)
        else:
            raise ValueError(f"unknown routing kind {spec.kind!r}")

    if spec.kind == "expert_choice":
        cf = 1.0 if spec.capacity_factor is None else spec.capacity_factor
        cap = capacity_for(tokens, k, experts, cf)
        assert cap is not None
        expert = expert_choice(probs, cap)
        weight = np.where(expert >= 0, probs * spec.scale, 0).astype(layer.dtype)
        scores = np.take_along_axis(probs, full, axis=1)
        return Route(spec.kind, k, logits, probs, full, scores, cap, expert, weight, None)

    cap = (
        None
        if spec.overflow == "dropless"
        else capacity_for(tokens, k, experts, spec.capacity_factor)
    )
    depth = full.shape[1] if spec.overflow == "reroute" else k
    ranking = full[:, :depth]
    scores = np.take_along_axis(probs, ranking, axis=1)
    a = assign(ranking, k, experts, cap, spec.overflow, spec.priority, scores)
    if spec.kind == "hash":
        renormalize = True
    elif spec.renormalize is None:
        renormalize = layer.router == "sigmoid"
    else:
        renormalize = spec.renormalize
    weight = combine_weights(probs, ranking, a.expert, k, renormalize, spec.scale)
    return Route(spec.kind, k, logits, probs, ranking, scores, a.capacity, a.expert, weight, a)


def shared_output(layer: ReferenceLayer, x: np.ndarray) -> np.ndarray:
    """Sum of the shared experts on every token (zeros without shared experts)."""
    x = _input(layer, x)
    if layer.shared is None:
        return np.zeros_like(x)
    out = sum((ffn(layer.shared, s, x) for s in range(layer.shared.n)), np.zeros_like(x))
    if layer.w_shared_gate is not None:
        out = out * sigmoid(x @ layer.w_shared_gate)
    return out


def aux_metrics(r: Route) -> AuxMetrics:
    """The aux quantities of a routing decision (see ``moesim.reference.metrics``)."""
    return AuxMetrics(
        load=r.counts,
        load_balancing_loss=load_balancing_loss(r.probs, r.ranking[:, 0]),
        z_loss=z_loss(r.logits),
        entropy=router_entropy(r.probs),
        dropped_slots=r.dropped_slots,
        dropped_tokens=r.dropped_tokens,
        rerouted=r.rerouted,
    )


def forward(
    layer: ReferenceLayer,
    x: np.ndarray,
    spec: RoutingSpec | None = None,
    *,
    rng: np.random.Generator | None = None,
    token_ids: np.ndarray | None = None,
    residual: bool = False,
) -> LayerOutput:
    """The layer on tokens ``x`` (T x d_model) by explicit gather / expert GEMMs / scatter-add."""
    x = _input(layer, x)
    r = route(layer, x, spec, rng=rng, token_ids=token_ids)
    plan = build_plan(r.expert, r.weight, layer.experts)
    out = run_experts(layer.routed, gather(x, plan), plan)
    y = scatter_combine(out, plan, x.shape[0]) + shared_output(layer, x)
    if residual:
        y = y + x
    return LayerOutput(y, r, plan, aux_metrics(r))


def dense_forward(
    layer: ReferenceLayer, x: np.ndarray, r: Route, *, residual: bool = False
) -> np.ndarray:
    """Every expert on every token, masked by the routing decision ``r`` and weighted.

    The reference that ``forward`` must match: ``y_t = sum_e M[t, e] * FFN_e(x_t)`` with
    ``M[t, e]`` the summed weight of token t's slots processed by expert e.
    """
    x = _input(layer, x)
    mask = np.zeros((x.shape[0], layer.experts), dtype=layer.dtype)
    for j in range(r.expert.shape[1]):
        rows = np.flatnonzero(r.expert[:, j] >= 0)
        np.add.at(mask, (rows, r.expert[rows, j].astype(np.int64)), r.weight[rows, j])
    y: np.ndarray = np.einsum("te,etd->td", mask, every_expert(layer.routed, x))
    y = y + shared_output(layer, x)
    if residual:
        y = y + x
    return y
