"""The router-logit model (``routing: {kind: logits}``): logits = per-expert bias + noise_std
x z, z standard normal per (token, MoE layer, expert), AR(1)-correlated over consecutive
tokens (``token_correlation``) and across consecutive MoE layers (``layer_correlation``);
each token takes the top_k of its logits (group-limited when the model says so).

Sampling is vectorized over blocks of :data:`BLOCK_TOKENS` tokens: the cross-layer AR(1)
runs over the layers (a loop over layers, not tokens), the temporal one as a linear filter
over the token axis carrying its state from block to block (and call to call, in a
:class:`LogitsStream`), so memory stays bounded by one block.

A share ``correlated_share`` of the noise variance carries the temporal AR(1); the rest is
drawn afresh for every token: a persistent part (what a request's context keeps steering
the router towards) plus per-token spread, the structure recorded traces show (the
overlap of consecutive tokens' experts is high at lag 1 and decays slowly after).

Fitting (:func:`fit_logits`): the bias is the log of each layer's measured popularity
(centred); the correlation (``correlated_share``, ``token_correlation``) is searched on a
grid, coordinate by coordinate, each candidate with the noise scale whose
distinct-experts-touched curve over batch sizes matches the trace's in the mean
(bisection: the curve grows with the noise), keeping the candidate with the smallest
worst relative error; then the noise scale and the bias are refined (top-k under noise
flattens the bias). The model's curve comes from independent windows of consecutive
tokens drawn with fixed random numbers, so the fit is deterministic and the comparison of
candidates is not blurred by sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.routing import LogitsRouting

BLOCK_TOKENS = 1024
"""Tokens drawn at a time."""


def _bias(cfg: LogitsRouting, experts: int, layers: int) -> np.ndarray:
    b = np.asarray(cfg.bias, dtype=np.float64)
    if b.shape[1] != experts:
        raise ValueError(
            f"routing.bias has {b.shape[1]} values per row, the model {experts} experts"
        )
    return b[np.arange(layers) % len(b)]


def _ar_time(x: np.ndarray, rho: float, prev: np.ndarray | None) -> np.ndarray:
    """AR(1) over axis 0 with unit stationary variance: y_t = rho y_{t-1} + sqrt(1-rho^2) x_t;
    the first y starts from ``prev`` (or stationary when None)."""
    if rho == 0.0:
        return x
    from scipy.signal import lfilter

    s = np.sqrt(1.0 - rho * rho)
    x = x.copy()
    if prev is None:
        x[0] /= s  # y_0 = x_0: stationary
        zi = np.zeros((1, *x.shape[1:]))
    else:
        zi = (rho * prev)[None]
    y, _ = lfilter([s], [1.0, -rho], x, axis=0, zi=zi)
    return np.asarray(y)


def _ar_layers(x: np.ndarray, rho: float) -> np.ndarray:
    """AR(1) across axis 1 (MoE layers), unit variance."""
    if rho == 0.0 or x.shape[1] < 2:
        return x
    s = np.sqrt(1.0 - rho * rho)
    out = x.copy()
    for layer in range(1, x.shape[1]):  # over layers, each step vectorized over tokens
        out[:, layer] = rho * out[:, layer - 1] + s * x[:, layer]
    return out


def _topk(logits: np.ndarray, k: int, groups: tuple[int, int] | None) -> np.ndarray:
    """Top-k experts along the last axis (best first), group-limited when asked."""
    if groups is not None and groups[1] < groups[0]:
        from moesim.routing.distributions import group_limited

        shape = logits.shape
        flat = logits.reshape(-1, shape[-1])
        lo = flat.min() - 1.0
        keys, _ = group_limited(flat - lo + 1.0, groups)  # positive keys; masked -> -1
        logits = keys.reshape(shape)
    top = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logits, top, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1)


class LogitsStream:
    """Consecutive tokens of a logits model at every MoE layer; the temporal AR(1) state
    carries over from one :meth:`take` to the next."""

    def __init__(
        self,
        cfg: LogitsRouting,
        experts: int,
        top_k: int,
        layers: int,
        gen: np.random.Generator,
        groups: tuple[int, int] | None = None,
    ) -> None:
        self.cfg, self.top_k, self.gen, self.groups = cfg, top_k, gen, groups
        self.bias = _bias(cfg, experts, layers)
        self.prev: np.ndarray | None = None

    def logits(self, n: int) -> np.ndarray:
        """[n, layers, experts] logits of the next n tokens (one block: n <= BLOCK_TOKENS)."""
        c = self.cfg
        z = self.gen.standard_normal((n, *self.bias.shape))
        z = _ar_layers(z, c.layer_correlation)
        z = _ar_time(z, c.token_correlation, self.prev)
        self.prev = z[-1].copy()
        share = c.correlated_share
        if share < 1.0:  # the rest of the variance: fresh for every token
            fresh = _ar_layers(self.gen.standard_normal(z.shape), c.layer_correlation)
            z = np.sqrt(share) * z + np.sqrt(1.0 - share) * fresh
        out: np.ndarray = self.bias[None] + c.noise_std * z
        return out

    def take(self, n: int) -> np.ndarray:
        """int64 [n, layers, top_k]: the next n tokens' experts at every layer."""
        parts = []
        done = 0
        while done < n:
            m = min(BLOCK_TOKENS, n - done)
            parts.append(_topk(self.logits(m), self.top_k, self.groups))
            done += m
        if not parts:
            return np.zeros((0, len(self.bias), self.top_k), dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


def layer_choices(
    cfg: LogitsRouting,
    experts: int,
    layers: int,
    layer: int,
    tokens: int,
    depth: int,
    gen: np.random.Generator,
    groups: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``tokens`` consecutive tokens at one MoE layer: ranking (int32, tokens x depth) and
    router probabilities (softmax of the logits over the ranked experts)."""
    one = LogitsRouting(
        kind="logits",
        bias=(tuple(_bias(cfg, experts, layers)[layer].tolist()),),
        noise_std=cfg.noise_std,
        token_correlation=cfg.token_correlation,
        correlated_share=cfg.correlated_share,
    )
    s = LogitsStream(one, experts, depth, 1, gen, groups)
    ranks, scores = [], []
    done = 0
    while done < tokens:
        m = min(BLOCK_TOKENS, tokens - done)
        lg = s.logits(m)[:, 0, :]
        r = _topk(lg, min(depth, experts), groups)
        x = np.take_along_axis(lg, r, axis=1)
        p = np.exp(x - x.max(axis=1, keepdims=True))
        ranks.append(r)
        scores.append(p / p.sum(axis=1, keepdims=True))
        done += m
    if not ranks:
        return np.zeros((0, depth), dtype=np.int32), np.zeros((0, depth), dtype=np.float32)
    return np.concatenate(ranks).astype(np.int32), np.concatenate(scores).astype(np.float32)


POPULARITY_TOKENS = 8192
ROUNDS = 3
"""Fit rounds: the noise scale by bisection, then the bias corrected by the popularity."""
BISECTIONS = 16


def logits_popularity(
    cfg: LogitsRouting, experts: int, layers: int, gen: np.random.Generator, top_k: int = 1
) -> np.ndarray:
    """Each layer's popularity (rows sum to 1), estimated from sampled tokens' choices."""
    s = LogitsStream(cfg, experts, max(1, top_k), layers, gen)
    picks = s.take(POPULARITY_TOKENS)
    counts = np.stack([np.bincount(picks[:, j].ravel(), minlength=experts) for j in range(layers)])
    c = counts.astype(float) + 1e-12
    out: np.ndarray = c / c.sum(axis=1, keepdims=True)
    return out


# --- fitting ---------------------------------------------------------------------


def distinct_curve(experts_of: np.ndarray, batches: list[int], experts: int) -> np.ndarray:
    """Mean distinct experts touched per MoE layer by batches of consecutive tokens:
    ``experts_of`` int [tokens, layers, top_k]; one value per batch size."""
    tokens, layers, _ = experts_of.shape
    out = []
    for b in batches:
        n = tokens // b
        if n == 0:
            out.append(np.nan)
            continue
        x = (
            experts_of[: n * b]
            .reshape(n, b, layers, -1)
            .transpose(0, 2, 1, 3)
            .reshape(n * layers, -1)
        )
        mask = np.zeros((n * layers, experts), dtype=bool)
        mask[np.arange(n * layers)[:, None], x] = True
        out.append(float(mask.sum(axis=1).mean()))
    return np.asarray(out)


def batch_sizes(tokens: int) -> list[int]:
    """Powers of two up to a quarter of the trace (at least 4 batches each)."""
    out, b = [], 1
    while b * 4 <= tokens and b <= 4096:
        out.append(b)
        b *= 2
    return out or [1]


SHARES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
"""Candidate ``correlated_share`` values of the fit's search."""
RHOS = (0.0, 0.9, 0.97, 0.99, 0.997, 0.999)
"""Candidate ``token_correlation`` values of the fit's search."""
PASSES = 2
"""Coordinate passes over (share, correlation)."""
SEARCH_BISECTIONS = 9
"""Bisection steps of the noise scale for each candidate of the search, within a factor 8
of the last candidate's (a ratio of 1.008)."""
FIT_TOKENS = 4096
"""Tokens of the model drawn per candidate of a fit (at least 16 windows)."""
"""Coordinate passes over (share, correlation)."""
WINDOW_TOKENS = 2048
"""Default tokens of :class:`Windows` (split into windows of the largest batch)."""


@dataclass(frozen=True)
class Fit:
    """A fitted logits model and how well its curve matches the trace's."""

    config: LogitsRouting
    batches: list[int]
    trace_curve: np.ndarray
    model_curve: np.ndarray

    @property
    def worst_error(self) -> float:
        """Largest relative difference of the two curves."""
        return worst_error(self.trace_curve, self.model_curve)


def worst_error(trace_curve: np.ndarray, model_curve: np.ndarray) -> float:
    """Largest relative difference of two distinct-experts curves (finite points)."""
    ok = np.isfinite(trace_curve)
    rel = np.abs(model_curve[ok] - trace_curve[ok]) / trace_curve[ok]
    return float(rel.max()) if rel.size else 0.0


class Windows:
    """A logits model's choices in independent windows of ``width`` consecutive tokens
    (each starting from the stationary state), from random numbers drawn once: every
    candidate of a fit is compared on the same draws. At least ``least`` windows, up to
    ``tokens`` tokens."""

    def __init__(
        self,
        layers: int,
        experts: int,
        top_k: int,
        width: int,
        seed: int,
        tokens: int = WINDOW_TOKENS,
        least: int = 4,
    ) -> None:
        windows = max(least, tokens // max(1, width))
        g = np.random.default_rng(seed)
        shape = (width, windows, layers, experts)  # token axis first (the AR filter's)
        self.persistent = g.standard_normal(shape)
        self.fresh = g.standard_normal(shape)
        self.top_k = top_k
        self._filtered: dict[float, np.ndarray] = {}

    def choices(self, bias: np.ndarray, sigma: float, share: float, rho: float) -> np.ndarray:
        """int [windows x width, layers, top_k] (each token's top_k, unordered), window by
        window."""
        if rho not in self._filtered:  # the AR(1) filter once per correlation
            self._filtered[rho] = _ar_time(self.persistent, rho, None)
        z = np.sqrt(share) * self._filtered[rho]
        if share < 1.0:
            z = z + np.sqrt(1.0 - share) * self.fresh
        k = self.top_k
        top = np.argpartition(-(bias[None, None] + sigma * z), k - 1, axis=-1)[..., :k]
        width, windows, layers, _ = top.shape
        return top.transpose(1, 0, 2, 3).reshape(windows * width, layers, k)


CHECK_TOKENS = 16384
"""Tokens of the model drawn for a curve checked against held-out data."""


def model_curve(
    cfg: LogitsRouting, batches: list[int], experts: int, top_k: int, layers: int, seed: int
) -> np.ndarray:
    """The distinct-experts curve of a logits model (no layer correlation, no groups)
    over ``batches``, from :class:`Windows` of the largest batch (:data:`CHECK_TOKENS`
    tokens, at least 16 windows)."""
    w = Windows(layers, experts, top_k, max(batches), seed, CHECK_TOKENS, 16)
    x = w.choices(
        _bias(cfg, experts, layers), cfg.noise_std, cfg.correlated_share, cfg.token_correlation
    )
    return distinct_curve(x, batches, experts)


def split(sample: np.ndarray, how: str, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A trace sample cut into a part to fit and a part to check: ``halves`` (the first
    half, then the second) or ``blocks`` (alternate blocks of ``block`` tokens: the even
    ones to fit, the odd ones to check; every part of the trace is in both)."""
    if how == "halves":
        half = len(sample) // 2
        return sample[:half], sample[half : 2 * half]
    n = len(sample) // (2 * block)
    pairs = sample[: n * 2 * block].reshape(n, 2, block, *sample.shape[1:])
    return (
        pairs[:, 0].reshape(n * block, *sample.shape[1:]),
        pairs[:, 1].reshape(n * block, *sample.shape[1:]),
    )


def fit_logits(
    counts: np.ndarray,
    sample: np.ndarray,
    experts: int,
    top_k: int,
    seed: int = 0,
    per_layer: bool = True,
    correlated: bool = True,
) -> Fit:
    """Fit a logits model to a trace: ``counts`` [layers, experts] (the popularity's
    data); ``sample`` int [tokens, layers, top_k], consecutive tokens (the curve's data).

    bias = log(popularity) (floored at 1e-3 of the mean share, centred per layer). With
    ``correlated``, :data:`PASSES` coordinate passes over ``correlated_share`` in
    :data:`SHARES` and ``token_correlation`` in :data:`RHOS`, each candidate at the noise
    scale found by bisection (log scale) on the mean relative error of the model's
    distinct-experts curve over :func:`batch_sizes` against the trace's, keep the
    candidate with the smallest worst relative error (without: independent tokens, the
    noise scale alone). Then :data:`ROUNDS` times: the noise scale again and the bias
    moved by log(measured / model popularity). Every candidate is drawn from the same
    :class:`Windows` (seeded): the fit is deterministic."""
    layers = counts.shape[0]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    floor = 1e-3 / experts
    bias = np.log(np.maximum(share, floor))
    bias -= bias.mean(axis=1, keepdims=True)
    if not per_layer:
        bias = bias.mean(axis=0, keepdims=True)
    batches = batch_sizes(len(sample))
    target = distinct_curve(sample, batches, experts)
    win = Windows(layers, experts, top_k, max(batches), seed, FIT_TOKENS, 16)
    last = [1.0]

    def curve(b: np.ndarray, sigma: float, s: float, rho: float) -> np.ndarray:
        return distinct_curve(win.choices(b, sigma, s, rho), batches, experts)

    def noise_for(b: np.ndarray, s: float, rho: float, steps: int = BISECTIONS) -> float:
        lo, hi = (1e-3, 64.0) if steps == BISECTIONS else (last[0] / 8, last[0] * 8)
        for _ in range(steps):  # the curve grows with sigma: bisect the mean signed error
            mid = float(np.sqrt(lo * hi))
            if np.nanmean(curve(b, mid, s, rho) / target - 1.0) < 0:
                lo = mid
            else:
                hi = mid
        last[0] = float(np.sqrt(lo * hi))
        return last[0]

    def score(s: float, rho: float) -> float:
        return worst_error(target, curve(bias, noise_for(bias, s, rho, SEARCH_BISECTIONS), s, rho))

    s, rho = 1.0, 0.0
    if correlated:
        s, rho = 0.9, 0.97
        noise_for(bias, s, rho)  # the search's bisections start around this scale
        for _ in range(PASSES):
            s = min(SHARES, key=lambda v: (score(v, rho), v))
            rho = min(RHOS, key=lambda v: (score(s, v), v))
    sigma = 1.0
    for _ in range(ROUNDS):
        sigma = noise_for(bias, s, rho)
        # top-k under noise flattens the bias: move it by the popularity still missed
        x = win.choices(bias, sigma, s, rho)
        got = np.stack([np.bincount(x[:, j].ravel(), minlength=experts) for j in range(layers)])
        got = got / np.maximum(got.sum(axis=1, keepdims=True), 1)
        if not per_layer:
            got = got.mean(axis=0, keepdims=True)
            want = share.mean(axis=0, keepdims=True)
        else:
            want = share
        bias = bias + np.log(np.maximum(want, floor) / np.maximum(got, floor))
        bias -= bias.mean(axis=1, keepdims=True)
    sigma = noise_for(bias, s, rho)  # the curve again, at the final bias
    cfg = LogitsRouting(
        kind="logits",
        bias=tuple(tuple(float(v) for v in r) for r in bias),
        noise_std=sigma,
        token_correlation=rho if s > 0 else 0.0,
        correlated_share=s if rho > 0 else 1.0,
    )
    return Fit(cfg, batches, target, curve(bias, sigma, s, rho))
