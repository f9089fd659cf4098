"""The router-logit model (``routing: {kind: logits}``): logits = per-expert bias + noise_std
x z, z standard normal per (token, MoE layer, expert), AR(1)-correlated over consecutive
tokens (``token_correlation``) and across consecutive MoE layers (``layer_correlation``);
each token takes the top_k of its logits (group-limited when the model says so).

Sampling is vectorized over blocks of :data:`BLOCK_TOKENS` tokens: the cross-layer AR(1)
runs over the layers (a loop over layers, not tokens), the temporal one as a linear filter
over the token axis carrying its state from block to block (and call to call, in a
:class:`LogitsStream`), so memory stays bounded by one block.

Fitting (:func:`fit_logits`): the bias is the log of each layer's measured popularity
(centred), and the noise scale is the one whose distinct-experts-touched curve over batch
sizes matches the trace's (bisection on the mean squared relative error; the curve grows
with the noise: zero noise routes every token to the same experts).
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
        ok = np.isfinite(self.trace_curve)
        rel = np.abs(self.model_curve[ok] - self.trace_curve[ok]) / self.trace_curve[ok]
        return float(rel.max()) if rel.size else 0.0


def fit_logits(
    counts: np.ndarray,
    sample: np.ndarray,
    experts: int,
    top_k: int,
    seed: int = 0,
    per_layer: bool = True,
) -> Fit:
    """Fit a logits model to a trace: ``counts`` [layers, experts] over the whole trace;
    ``sample`` int [tokens, layers, top_k], consecutive tokens of it (the curve's data).

    bias = log(popularity) (floored at 1e-3 of the mean share, centred per layer); then
    :data:`ROUNDS` times: the noise scale by bisection (log scale) on the mean relative
    error of the model's distinct-experts curve over :func:`batch_sizes` against the
    trace's, and the bias moved by log(measured / model popularity) (top-k under noise
    flattens it). Every candidate is drawn with one fixed seed: the fit is deterministic."""
    layers = counts.shape[0]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    floor = 1e-3 / experts
    bias = np.log(np.maximum(share, floor))
    bias -= bias.mean(axis=1, keepdims=True)
    if not per_layer:
        bias = bias.mean(axis=0, keepdims=True)
    batches = batch_sizes(len(sample))
    target = distinct_curve(sample, batches, experts)
    n = min(max(batches) * 8, 16384)

    def draw(b: np.ndarray, sigma: float) -> tuple[LogitsRouting, np.ndarray]:
        cfg = LogitsRouting(
            kind="logits", bias=tuple(tuple(float(v) for v in r) for r in b), noise_std=sigma
        )
        return cfg, LogitsStream(cfg, experts, top_k, layers, np.random.default_rng(seed)).take(n)

    def err(x: np.ndarray) -> float:
        return float(np.nanmean(distinct_curve(x, batches, experts) / target - 1.0))

    sigma = 1.0
    for _ in range(ROUNDS):
        lo, hi = 1e-3, 64.0
        for _ in range(BISECTIONS):  # the curve grows with sigma: bisect the mean signed error
            mid = float(np.sqrt(lo * hi))
            if err(draw(bias, mid)[1]) < 0:
                lo = mid
            else:
                hi = mid
        sigma = float(np.sqrt(lo * hi))
        # top-k under noise flattens the bias: move it by the popularity still missed
        _, x = draw(bias, sigma)
        got = np.stack([np.bincount(x[:, j].ravel(), minlength=experts) for j in range(layers)])
        got = got / np.maximum(got.sum(axis=1, keepdims=True), 1)
        if not per_layer:
            got = got.mean(axis=0, keepdims=True)
            want = share.mean(axis=0, keepdims=True)
        else:
            want = share
        bias = bias + np.log(np.maximum(want, floor) / np.maximum(got, floor))
        bias -= bias.mean(axis=1, keepdims=True)
    cfg, x = draw(bias, sigma)
    return Fit(cfg, batches, target, distinct_curve(x, batches, experts))
