"""Expert popularity from a routing distribution, and token choices sampled from it.

Token choices are drawn with the Gumbel-top-k trick: adding Gumbel noise to log-popularity
and sorting gives, per token, a sample without replacement from the popularity (the
Plackett-Luce model), i.e. its first, second, ... choice, and a full ranking to reroute
along. The noisy keys' softmax stands in for router probabilities.
"""

from __future__ import annotations

import math

import numpy as np

from moesim.config.routing import (
    DirichletRouting,
    HotRouting,
    LogitsRouting,
    PopularityRouting,
    RoutingConfig,
    TraceRouting,
    UniformRouting,
    ZipfRouting,
)


def popularity(cfg: RoutingConfig, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Probability of each expert being chosen (sums to 1)."""
    if isinstance(cfg, UniformRouting):
        p = np.full(experts, 1.0 / experts)
    elif isinstance(cfg, ZipfRouting):
        p = np.arange(1, experts + 1, dtype=float) ** -cfg.s
    elif isinstance(cfg, DirichletRouting):
        p = rng.dirichlet(np.full(experts, cfg.alpha))
    elif isinstance(cfg, PopularityRouting):
        p = np.asarray(cfg.weights, dtype=float)
    elif isinstance(cfg, TraceRouting | LogitsRouting):
        return layer_popularities(cfg, experts, 1, rng)[0]
    elif isinstance(cfg, HotRouting):
        n_hot = int(min(experts - 1, max(1, math.floor(cfg.hot_fraction * experts + 0.5))))
        if experts == 1:
            p = np.ones(1)
        else:
            p = np.empty(experts)
            p[:n_hot] = cfg.hot_share / n_hot
            p[n_hot:] = (1.0 - cfg.hot_share) / (experts - n_hot)
    else:  # pragma: no cover - the config union is closed
        raise TypeError(f"unknown routing {cfg!r}")
    p = p / p.sum()
    if cfg.permute:
        p = p[rng.permutation(experts)]
    return p


def layer_popularities(
    cfg: RoutingConfig, experts: int, layers: int, rng: np.random.Generator
) -> np.ndarray:
    """Each MoE layer's popularity (``layers x experts``, rows sum to 1). Row 0 is
    :func:`popularity` drawn from the same stream; with ``cfg.layers == "independent"``
    the other rows are further Dirichlet draws, or seeded shuffles of row 0's values for
    the ranked kinds; otherwise every row is row 0. A trace gives each layer's measured
    popularity, a logits model each layer's (estimated from sampled tokens)."""
    n = max(1, layers)
    if isinstance(cfg, TraceRouting):
        from moesim.routing.trace import trace_info

        pops = trace_info(cfg.path, experts).popularity()
        return pops[np.arange(n) % len(pops)]
    if isinstance(cfg, LogitsRouting):
        from moesim.routing.logits import logits_popularity

        return logits_popularity(cfg, experts, n, rng)
    first = popularity(cfg, experts, rng)
    if cfg.layers == "same" or n == 1:
        return np.tile(first, (n, 1))
    rows = [first]
    for _ in range(1, n):
        if isinstance(cfg, DirichletRouting):
            rows.append(rng.dirichlet(np.full(experts, cfg.alpha)))
        else:
            rows.append(first[rng.permutation(experts)])
    return np.vstack(rows)


def drifted(p: np.ndarray, shift: float) -> np.ndarray:
    """``p`` rotated by ``shift`` experts (fractional shifts interpolate between the two
    neighbouring whole rotations): expert ``e`` gets the weight of expert ``e - shift``."""
    whole = math.floor(shift)
    frac = shift - whole
    a = np.roll(p, whole, axis=-1)
    if frac == 0.0:
        return a
    return (1.0 - frac) * a + frac * np.roll(p, whole + 1, axis=-1)


def popularity_at(cfg: RoutingConfig, p: np.ndarray, time_s: float) -> np.ndarray:
    """The popularity at simulated time ``time_s``: ``p`` itself without ``drift``, else
    ``p`` rotated by ``time_s / drift.period_s`` experts."""
    if cfg.drift is None:
        return p
    return drifted(p, time_s / cfg.drift.period_s)


def group_limited(keys: np.ndarray, groups: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Node/group-limited routing (DeepSeek-V2/V3): the experts form ``groups[0]`` equal
    contiguous groups; a group's score is the sum of its two best keys; each token keeps its
    ``groups[1]`` best groups and the others' keys are set to -1 (never chosen ahead of a
    kept expert). Returns the masked keys and how many experts each token may reach."""
    tokens, experts = keys.shape
    n_groups, keep = groups
    size = experts // n_groups
    grouped = keys.reshape(tokens, n_groups, size)
    best = np.sort(grouped, axis=2)[:, :, -min(2, size) :].sum(axis=2)
    chosen = np.argsort(-best, axis=1, kind="stable")[:, :keep]
    mask = np.ones((tokens, n_groups), dtype=bool)
    mask[np.arange(tokens)[:, None], chosen] = False
    out = keys.copy()
    out[np.repeat(mask, size, axis=1)] = -1.0
    return out, keep * size


def sample_choices(
    rng: np.random.Generator,
    p: np.ndarray,
    tokens: int,
    depth: int,
    groups: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each token's ``depth`` best experts in order, and their router probabilities.

    Gumbel-top-k in multiplicative form: with E ~ Exp(1) i.i.d., ranking experts by
    p / E is ranking by log p + Gumbel noise, i.e. sampling without replacement in
    proportion to p. Router probabilities are softmax(log p + Gumbel) = (p/E) / sum(p/E).
    With ``groups`` = (expert groups, groups per token), choices are group-limited
    (:func:`group_limited`): the ranking holds only the kept groups' experts.
    Returns ``ranking`` (int32, tokens x depth) and ``scores`` (float32, tokens x depth).
    """
    experts = p.shape[0]
    depth = min(depth, experts)
    if groups is not None and groups[1] < groups[0]:
        depth = min(depth, groups[1] * (experts // groups[0]))
    ranking = np.empty((tokens, depth), dtype=np.int32)
    scores = np.empty((tokens, depth), dtype=np.float32)
    # Drawn in chunks of rows: the same stream and the same float32 operations as one
    # draw of (tokens x experts), but the work array stays in cache and is reused.
    rows = max(1, min(tokens, _CHUNK_ELEMENTS // max(1, experts)))
    buf = np.empty((rows, experts), dtype=np.float32)
    p32 = p.astype(np.float32)[None, :]
    tiny = np.finfo(np.float32).tiny
    for start in range(0, tokens, rows):
        n = min(rows, tokens - start)
        w = buf[:n]
        rng.standard_exponential(out=w, dtype=np.float32)
        np.maximum(w, tiny, out=w)
        np.divide(p32, w, out=w)
        w /= w.sum(axis=1, keepdims=True)
        if groups is not None and groups[1] < groups[0]:
            w, _ = group_limited(w, groups)
        rk, sc = top_choices(w, depth, inplace=True)
        ranking[start : start + n] = rk
        scores[start : start + n] = sc
    return ranking, scores


_CHUNK_ELEMENTS = 1 << 18
"""Elements of the work array of :func:`sample_choices` (1 MiB of float32)."""


def top_choices(
    w: np.ndarray, depth: int, inplace: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``depth`` largest entries, best first: (ranking int32, scores float32).
    With ``inplace`` the chosen entries of ``w`` may be overwritten."""
    tokens, experts = w.shape
    if depth == experts:
        ranking = np.argsort(-w, axis=1, kind="stable")
        scores = np.take_along_axis(w, ranking, axis=1)
    elif depth <= 8:
        ranking = np.empty((tokens, depth), dtype=np.int64)
        scores = np.empty((tokens, depth), dtype=np.float32)
        rows = np.arange(tokens)
        work = w if inplace else w.copy()
        for j in range(depth):  # repeated argmax beats a partition for small k
            ranking[:, j] = work.argmax(axis=1)
            scores[:, j] = work[rows, ranking[:, j]]
            work[rows, ranking[:, j]] = -1.0
    else:
        top = np.argpartition(-w, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(w, top, axis=1), axis=1, kind="stable")
        ranking = np.take_along_axis(top, order, axis=1)
        scores = np.take_along_axis(w, ranking, axis=1)
    return ranking.astype(np.int32), scores.astype(np.float32)
