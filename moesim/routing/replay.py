"""Routing that produces each token's choices itself, per MoE layer and in order: a recorded
trace (:mod:`moesim.routing.trace`) or a logits model (:mod:`moesim.routing.logits`).

Two ways a run uses it (docs/routing.md):

- **In order** (:class:`RoutingFeed`): the workload takes the next tokens for each batch it
  runs (the ``layer`` workload its T tokens, a serving iteration its batch, a training
  step its micro-batches), at every MoE layer; the feed counts what it handed out
  (:class:`RoutingUse`), and the expert caches of offloading see exactly those experts.
- **Expected layer costs** (:func:`window_choices`): sample ``i`` of ``n`` of a batch size
  ``N`` routes, at MoE layer ``(i x layers) // n``, the trace's tokens ``[i N, (i+1) N)``
  (from a pool of the trace's first tokens, :data:`POOL_BYTES` at most, cycled for
  larger batches), or ``N`` fresh tokens of the logits model; a deterministic function of
  (N, i), so memoized costs do not depend on which run priced them first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from moesim import rng
from moesim.config.model import ModelConfig
from moesim.config.routing import LogitsRouting, RoutingConfig, TraceRouting
from moesim.config.scenario import Scenario
from moesim.routing.logits import LogitsStream, layer_choices
from moesim.routing.route import model_groups
from moesim.routing.trace import TraceCursor, trace_info

POOL_BYTES = 64 * 2**20
"""The most memory the trace's first tokens take for the expected layer costs."""
MIN_POOL_TOKENS = 4096


def replayed(cfg: RoutingConfig) -> bool:
    """Whether the routing produces its own choices (trace, logits)."""
    return isinstance(cfg, TraceRouting | LogitsRouting)


@dataclass
class RoutingUse:
    """What a run took from a routing feed."""

    kind: str
    tokens: int = 0
    """Tokens handed out (each at every MoE layer)."""
    passes: int = 0
    """Times a trace was started again from its first token (0: it sufficed)."""
    trace_tokens: int | None = None
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    """int64 [moe_layers, experts]: choices handed out per layer and expert."""
    priced: np.ndarray | None = None
    """int64 [moe_layers, experts]: kept token slots of the routed layers that priced the
    run's batches (serving iterations, training micro-batches), per layer and expert;
    None where nothing was priced per batch (:mod:`moesim.cost.routed_layers`)."""

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "tokens": self.tokens}
        if self.trace_tokens is not None:
            out["trace_tokens"] = self.trace_tokens
            out["cycled"] = self.passes
            if self.passes:
                out["note"] = (
                    f"the workload needed {self.tokens} tokens, the trace holds "
                    f"{self.trace_tokens}: it was replayed from its start {self.passes} "
                    "more time(s)"
                )
        return out


class RoutingFeed:
    """Consecutive tokens' experts at every MoE layer, counted as they are handed out."""

    def __init__(self, s: Scenario, purpose: str = "routing-feed") -> None:
        m = s.model
        cfg = s.routing
        self.experts, self.layers = m.experts, len(m.moe_layer_indices)
        self.cursor: TraceCursor | None = None
        self.stream: LogitsStream | None = None
        self.decode_stream: LogitsStream | None = None
        """Decode tokens' own stream (``routing.decode``), else None: one stream for all."""
        if isinstance(cfg, TraceRouting):
            self.cursor = TraceCursor(cfg.path, m.experts)
            total: int | None = trace_info(cfg.path, m.experts).tokens
        else:
            assert isinstance(cfg, LogitsRouting)
            self.stream = LogitsStream(
                cfg, m.experts, m.top_k, self.layers, rng.stream(s.seed, purpose), model_groups(m)
            )
            if cfg.decode is not None:
                self.decode_stream = LogitsStream(
                    cfg.for_decode(),
                    m.experts,
                    m.top_k,
                    self.layers,
                    rng.stream(s.seed, f"{purpose}-decode"),
                    model_groups(m),
                )
            total = None
        self.use = RoutingUse(
            cfg.kind,
            trace_tokens=total,
            counts=np.zeros((self.layers, self.experts), dtype=np.int64),
        )

    def take(self, n: int, decodes: int = 0) -> np.ndarray:
        """int64 [n, moe_layers, top_k]: the next ``n`` tokens' experts. ``decodes`` of them
        are decode tokens: with a logits model's ``decode`` parameters they come first,
        from the decode stream, the rest from the prompt's (a trace is read in order)."""
        if self.cursor is not None:
            x = self.cursor.take(n).experts
            self.use.passes = self.cursor.passes
        else:
            assert self.stream is not None
            d = min(max(0, decodes), n) if self.decode_stream is not None else 0
            x = self.stream.take(n - d)
            if d:
                assert self.decode_stream is not None
                x = np.concatenate([self.decode_stream.take(d), x])
        if n:
            off = (np.arange(self.layers) * self.experts)[None, :, None]
            self.use.counts += np.bincount(
                (x + off).ravel(), minlength=self.layers * self.experts
            ).reshape(self.layers, self.experts)
        self.use.tokens += n
        return x


def routing_feed(s: Scenario, purpose: str = "routing-feed") -> RoutingFeed | None:
    """The run's feed of routed tokens, or None for popularity-sampled routing."""
    return RoutingFeed(s, purpose) if replayed(s.routing) else None


def consume(s: Scenario, tokens: int, batch: int) -> RoutingUse | None:
    """Take ``tokens`` tokens from a fresh feed in batches of ``batch`` (what a workload
    that only needs the counts consumes); None for popularity-sampled routing."""
    feed = routing_feed(s)
    if feed is None:
        return None
    left = tokens
    while left > 0:
        n = min(max(1, batch), left)
        feed.take(n)
        left -= n
    return feed.use


@lru_cache(maxsize=4)
def _pool(path: str, size: int, mtime_ns: int, experts: int) -> np.ndarray:
    info = trace_info(path, experts)
    per_token = max(1, info.moe_layers * info.top_k * 2)
    n = min(info.tokens, max(MIN_POOL_TOKENS, POOL_BYTES // per_token))
    x = TraceCursor(path, experts).take(n).experts
    return x.astype(np.int16 if experts <= 32767 else np.int32)


def trace_pool(path: str, experts: int) -> np.ndarray:
    """The first tokens of a trace ([tokens, moe_layers, top_k], at most POOL_BYTES)."""
    st = os.stat(path)
    return _pool(path, st.st_size, st.st_mtime_ns, experts)


def extend_ranking(top: np.ndarray, order: np.ndarray, depth: int) -> np.ndarray:
    """Each token's recorded ``top`` (tokens x k) followed by the other experts in
    ``order`` (the layer's experts, most popular first) up to ``depth`` (for reroute)."""
    tokens, k = top.shape
    experts = order.shape[0]
    if depth <= k:
        return top[:, :depth]
    held = np.zeros((tokens, experts), dtype=bool)
    held[np.arange(tokens)[:, None], top] = True
    rest = np.broadcast_to(order, (tokens, experts))[~held[:, order]].reshape(tokens, experts - k)
    return np.concatenate([top, rest[:, : depth - k]], axis=1)


def recorded_choices(
    top: np.ndarray, popularity: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ranking and scores of recorded choices: the recorded experts (equal weights), then,
    for reroute, the others by the layer's popularity."""
    k = top.shape[1]
    order = np.argsort(-popularity, kind="stable")
    ranking = extend_ranking(top.astype(np.int64), order, depth)
    scores = np.zeros(ranking.shape, dtype=np.float32)
    scores[:, :k] = 1.0 / k
    return ranking.astype(np.int32), scores


def window_choices(
    s: Scenario, tokens: int, i: int, n: int, depth: int, gen: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Routing sample ``i`` of ``n`` of a batch of ``tokens`` (module docstring)."""
    m: ModelConfig = s.model
    cfg = s.routing
    layers = len(m.moe_layer_indices)
    layer = (i * layers) // max(1, n)
    if isinstance(cfg, TraceRouting):
        pool = trace_pool(cfg.path, m.experts)
        rows = (i * tokens + np.arange(tokens)) % len(pool)
        pop = trace_info(cfg.path, m.experts).popularity()[layer]
        return recorded_choices(pool[rows, layer, :], pop, depth)
    assert isinstance(cfg, LogitsRouting)
    return layer_choices(cfg, m.experts, layers, layer, tokens, depth, gen, model_groups(m))
