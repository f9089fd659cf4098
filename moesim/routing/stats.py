"""Statistics of a routing trace (``moesim routing stats``): popularity, entropy, per-layer
skew, cross-layer correlation, and reuse distances with the LRU hit-rate curve they imply.

Reuse distance (Mattson et al. 1970) at token granularity, per MoE layer: a token's k
experts at a layer are one step (fetched together); an expert used at step t has distance
d = the number of distinct other experts of that layer used since its previous use. An
LRU cache of C experts per layer, updated a step at a time, holds it at step t exactly
when d < C, so one pass gives the hit rate of every cache size (the closed form the
offload simulation is tested against, ``tests/test_routing_trace.py``).
"""

from __future__ import annotations

import numpy as np


def reuse_distances(
    steps: list[np.ndarray], experts: int, warm: np.ndarray | None = None
) -> np.ndarray:
    """Distance of every use, in order (inf for a first use): ``steps[t]`` the distinct
    experts used at step t (in the order they are used); ``warm`` experts assumed used
    before the first step, most recent first (a cache filled hottest first)."""
    last = np.full(experts, -np.inf)
    if warm is not None:
        last[warm] = -1.0 - np.arange(len(warm))
    pos = 0.0
    out = []
    for keys in steps:  # one step at a time, vectorized over the experts
        k = np.asarray(keys, dtype=np.int64)
        seen = np.isfinite(last[k])
        d = (last[None, :] > last[k][:, None]).sum(axis=1).astype(float)
        out.append(np.where(seen, d, np.inf))
        last[k] = pos + np.arange(len(k))
        pos += len(k)
    return np.concatenate(out) if out else np.zeros(0)


def lru_hit_curve(distances: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The LRU hit rate at each cache size (experts per layer) from reuse distances."""
    if distances.size == 0:
        return np.zeros(len(sizes))
    return np.asarray([(distances < c).mean() for c in sizes])


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row of a popularity, bits."""
    q = np.where(p > 0, p, 1.0)
    out: np.ndarray = -(p * np.log2(q)).sum(axis=-1)
    return out


def cross_layer_correlation(experts_of: np.ndarray, experts: int) -> np.ndarray:
    """For consecutive MoE layers (l, l+1): the mean Pearson correlation over tokens of the
    one-hot choice vectors (0 for independent layers with the same popularity... not
    exactly: a shared popularity alone gives ~0; positive means tokens that pick an expert
    at layer l tend to pick the same ids at l+1)."""
    tokens, layers, _ = experts_of.shape
    out = []
    onehot = np.zeros((tokens, layers, experts), dtype=np.float32)
    onehot[np.arange(tokens)[:, None, None], np.arange(layers)[None, :, None], experts_of] = 1.0
    for layer in range(layers - 1):
        a = onehot[:, layer] - onehot[:, layer].mean(axis=0)
        b = onehot[:, layer + 1] - onehot[:, layer + 1].mean(axis=0)
        den = np.sqrt((a * a).sum() * (b * b).sum())
        out.append(float((a * b).sum() / den) if den > 0 else 0.0)
    return np.asarray(out)


def trace_stats(
    counts: np.ndarray, sample: np.ndarray, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
) -> dict[str, object]:
    """The figures ``moesim routing stats`` prints: ``counts`` [layers, experts] over the
    whole trace, ``sample`` int [tokens, layers, top_k] its first tokens (for correlation
    and reuse distance)."""
    layers, experts = counts.shape
    pop = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ent = entropy_bits(pop)
    top_share = np.sort(pop, axis=1)[:, ::-1]
    k = sample.shape[2]
    hot = max(1, experts // 8)
    distances = np.concatenate(
        [reuse_distances([np.sort(t) for t in sample[:, j, :]], experts) for j in range(layers)]
    )
    finite = distances[np.isfinite(distances)]
    cache = [c for c in sizes if k <= c <= experts]
    curve = lru_hit_curve(distances, np.asarray(cache))
    return {
        "layers": layers,
        "experts": experts,
        "top_k": k,
        "popularity": np.round(pop.mean(axis=0), 6).tolist(),
        "entropy_bits": {
            "mean": round(float(ent.mean()), 4),
            "min": round(float(ent.min()), 4),
            "max_possible": round(float(np.log2(experts)), 4),
        },
        "per_layer_max_over_mean": np.round(top_share[:, 0] * experts, 4).tolist(),
        f"hottest_{hot}_share_per_layer": np.round(top_share[:, :hot].sum(axis=1), 4).tolist(),
        "cross_layer_correlation": np.round(cross_layer_correlation(sample, experts), 4).tolist(),
        "reuse_distance": {
            "first_uses": int((~np.isfinite(distances)).sum()),
            "median": float(np.median(finite)) if finite.size else None,
            "mean": round(float(finite.mean()), 4) if finite.size else None,
        },
        "lru_hit_rate": {str(c): round(float(h), 6) for c, h in zip(cache, curve)},
    }
