"""Why a logits model fitted on one prompt of a recorded trace misses another
(docs/routing-fidelity.md): per prompt, the popularity's entropy, the distinct experts
per layer, the cosine of the two prompts' popularities, the overlap of tokens' experts at
lags 1 and 16, and four fits checked against the second prompt's distinct-experts curve:
the first prompt's model; the second prompt's bias (popularity) with the first's dynamics
(noise, correlated share, correlation: a per-prompt bias); the first's bias with the
second's dynamics; the second's own (in sample).

    python3 -m moesim.calibrate.routing_prompts [TRACE.npz ...]

Each trace: two prompts, each ``--prompt-tokens`` then ``--decode-tokens`` (the H200
traces: 128 + 128). A few minutes of CPU per trace (four fits)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from moesim.routing.logits import (
    batch_sizes,
    distinct_curve,
    fit_logits,
    model_curve,
    worst_error,
)
from moesim.routing.trace import TraceCursor, trace_info

DEFAULT = [
    "moesim/catalog/measurements/h200_offload_decode_2026-12-03/qwen1.5-moe-a2.7b-l8.npz",
    "moesim/catalog/measurements/h200_offload_decode_2026-12-03/olmoe-1b-7b-l8.npz",
]


def _counts(s: np.ndarray, experts: int) -> np.ndarray:
    return np.stack([np.bincount(s[:, j].ravel(), minlength=experts) for j in range(s.shape[1])])


def _entropy_bits(c: np.ndarray) -> float:
    p = c / c.sum(axis=1, keepdims=True)
    logs = np.log2(np.where(p > 0, p, 1.0))
    return float(np.mean(-(p * logs).sum(axis=1)))


def _overlap(s: np.ndarray, lag: int) -> float:
    k = s.shape[2]
    a, b = np.sort(s[:-lag], axis=2), np.sort(s[lag:], axis=2)
    same = (a[..., :, None] == b[..., None, :]).any(axis=3).sum(axis=2)
    return float(same.mean() / k)


def _prompt_ids(path: str) -> list[np.ndarray] | None:
    """The prompts' token ids as the recorder drew them (its seeded Zipf law: the trace's
    ``.env.json`` gives seed, vocabulary and prompt size), or None without that record."""
    import json
    import random
    from pathlib import Path

    from moesim.calibrate.torch_routing import zipf_ids

    env_path = Path(path).with_suffix(".env.json")
    if not env_path.exists():
        return None
    env = json.loads(env_path.read_text())
    if env.get("source") != "hf":
        return None
    rng = random.Random(env["seed"])
    vocab, n = int(env["hf_config"]["vocab_size"]), int(env["prompt_tokens"])
    return [np.array(zipf_ids(rng, vocab, n)) for _ in range(int(env["prompts"]))]


def _pair_overlap(ids: np.ndarray, part: np.ndarray) -> tuple[float, float]:
    """Mean overlap of two tokens' experts (share of top-k in common, over the layers),
    over pairs with the same token id and over the other pairs."""
    k = part.shape[2]
    srt = np.sort(part, axis=2)
    i, j = np.triu_indices(len(ids), 1)
    common = (srt[i][..., :, None] == srt[j][..., None, :]).any(axis=3).sum(axis=2) / k
    ov = common.mean(axis=1)
    same = ids[i] == ids[j]
    return float(ov[same].mean()), float(ov[~same].mean())


def report(path: str, seed: int = 0) -> None:
    info = trace_info(path)
    x = TraceCursor(path).take(info.tokens).experts
    e, k, layers = info.experts, info.top_k, info.moe_layers
    half = len(x) // 2
    a, b = x[:half], x[half : 2 * half]
    ca, cb = _counts(a, e), _counts(b, e)
    cos = np.mean(
        [ca[j] @ cb[j] / np.linalg.norm(ca[j]) / np.linalg.norm(cb[j]) for j in range(layers)]
    )
    print(f"{path}: {info.tokens} tokens, {e} experts, top-{k}, {layers} MoE layers")
    print(
        f"  entropy bits: prompt 1 {_entropy_bits(ca):.2f}, prompt 2 {_entropy_bits(cb):.2f};"
        f" distinct experts per layer {np.mean((ca > 0).sum(1)):.1f} / "
        f"{np.mean((cb > 0).sum(1)):.1f}; popularity cosine {cos:.2f}"
    )
    print(
        f"  overlap of experts at lag 1: {_overlap(a, 1):.2f} / {_overlap(b, 1):.2f};"
        f" lag 16: {_overlap(a, 16):.2f} / {_overlap(b, 16):.2f}"
    )
    ids = _prompt_ids(path)
    if ids is not None:  # token identity: do same-id tokens route alike, within a prefill?
        prompt = ids[0].size
        for n, (tok, part) in enumerate(zip(ids, (a[:prompt], b[:prompt])), start=1):
            same, other = _pair_overlap(tok, part)
            print(
                f"  prompt {n}'s prefill: {np.unique(tok).size} distinct token ids; overlap of"
                f" same-id pairs {same:.2f}, other pairs {other:.2f}"
            )
    batches = batch_sizes(len(b))
    target = distinct_curve(b, batches, e)
    for label, counts, sample in (
        ("prompt 1's model", ca, a),
        ("prompt 2's bias, prompt 1's dynamics", cb, a),
        ("prompt 1's bias, prompt 2's dynamics", ca, b),
        ("prompt 2's own (in sample)", cb, b),
    ):
        cfg = fit_logits(counts, sample, e, k, seed=seed).config
        model = model_curve(cfg, batches, e, k, layers, seed + 1)
        print(
            f"  {label:<38} against prompt 2: worst {worst_error(target, model):.1%}"
            f" (share {cfg.correlated_share}, correlation {cfg.token_correlation},"
            f" noise {cfg.noise_std:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="*", default=DEFAULT)
    args = ap.parse_args(argv)
    for path in args.traces:
        report(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
