"""Router of the reference layer: gate logits, scoring, and each routing kind's selection.

The gate is linear, ``logits = x @ W_g`` (no bias), optionally with the noise of noisy top-k
gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 4):
``logits += N(0, 1) * softplus(x @ W_noise)``, drawn from a ``numpy.random.Generator`` the
caller passes (never the global RNG).

Scoring: ``softmax`` over experts (GShard, Switch, Mixtral), or ``sigmoid`` per expert
(DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2), whose selected weights are normalized over the
top-k. An optional per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing,
``e_score_correction_bias``) is added to the scores for *selection only*: it changes which
experts are ranked first, never the combine weights.

Selections (each returns experts in preference order, ties to the lower expert index):

- ``rank_experts``: token choice top-k (and Switch top-1): experts sorted by score.
- ``group_limited_ranking``: DeepSeek's group-limited routing: the experts are split into
  ``expert_groups`` equal groups; a group's score is the sum of its best ``group_top``
  selection scores (DeepSeek-V3: top-2; DeepSeek-V2's max is ``group_top=1``); each token
  keeps its ``topk_groups`` best groups and ranks only their experts. Experts of the other
  groups are *excluded* from the ranking (DeepSeek masks them out), so a reroute can never
  leave the chosen groups.
- ``expert_choice``: Zhou et al. 2022 ("Mixture-of-Experts with Expert Choice Routing"):
  every expert takes its ``capacity`` highest-scoring tokens (ties to the lower token index).
- ``hash_ranking``: Roller et al. 2021 ("Hash Layers For Large Sparse Models"): a fixed
  function of the token id, either ``(id + j) % experts`` for the j-th choice, or a random
  table of per-id expert permutations drawn once from a seeded generator.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from moesim.reference.functional import sigmoid, softmax, softplus

Scoring = Literal["softmax", "sigmoid"]


def gate_logits(
    x: np.ndarray,
    w_gate: np.ndarray,
    w_noise: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Router logits (T x E): ``x @ w_gate``, plus noisy top-k noise when ``w_noise`` is given.

    The noise is ``N(0, 1) * softplus(x @ w_noise)`` (Shazeer et al. 2017), one standard
    normal per (token, expert) from ``rng``, which is then required.
    """
    logits: np.ndarray = x @ w_gate
    if w_noise is not None:
        if rng is None:
            raise ValueError("noisy gating needs a numpy.random.Generator")
        std = softplus(x @ w_noise)
        logits = logits + rng.standard_normal(logits.shape).astype(logits.dtype) * std
    return logits


def score(logits: np.ndarray, scoring: Scoring) -> np.ndarray:
    """Router probabilities (T x E): softmax over experts, or an independent sigmoid each."""
    if scoring == "softmax":
        return softmax(logits, axis=1)
    if scoring == "sigmoid":
        return sigmoid(logits)
    raise ValueError(f"unknown scoring {scoring!r}")


def selection_scores(probs: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Scores used to *choose* experts: the probabilities plus the per-expert bias, if any."""
    return probs if bias is None else probs + bias[None, :]


def rank_experts(selection: np.ndarray, depth: int | None = None) -> np.ndarray:
    """Each token's ``depth`` best experts by selection score (T x depth, int64), best first."""
    order = np.argsort(-selection, axis=1, kind="stable")
    return order if depth is None else order[:, :depth]


def group_limited_ranking(
    selection: np.ndarray, expert_groups: int, topk_groups: int, group_top: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Group-limited ranking: experts of each token's chosen groups only, best first.

    Returns ``ranking`` (T x topk_groups * E / expert_groups, int64) and ``groups``
    (T x topk_groups, int64: the chosen groups, best first).
    """
    tokens, experts = selection.shape
    if experts % expert_groups:
        raise ValueError(f"expert_groups={expert_groups} does not divide experts={experts}")
    if not 1 <= topk_groups <= expert_groups:
        raise ValueError(f"topk_groups={topk_groups} not in 1..{expert_groups}")
    size = experts // expert_groups
    grouped = selection.reshape(tokens, expert_groups, size)
    best = -np.sort(-grouped, axis=2)[:, :, : min(group_top, size)]
    group_score = best.sum(axis=2)
    groups = np.argsort(-group_score, axis=1, kind="stable")[:, :topk_groups]
    chosen = np.zeros((tokens, expert_groups), dtype=bool)
    chosen[np.arange(tokens)[:, None], groups] = True
    masked = np.where(np.repeat(chosen, size, axis=1), selection, -np.inf)
    ranking = np.argsort(-masked, axis=1, kind="stable")[:, : topk_groups * size]
    return ranking, groups


def expert_choice(probs: np.ndarray, capacity: int) -> np.ndarray:
    """Expert choice routing: a (T x E) int64 table, entry (t, e) = e if expert e took token t.

    Every expert takes exactly ``min(capacity, T)`` tokens, its highest-probability ones
    (ties to the lower token index); entries of tokens it did not take are -1. A token may
    be taken by any number of experts, zero included.
    """
    tokens, experts = probs.shape
    c = min(capacity, tokens)
    taken = np.argsort(-probs, axis=0, kind="stable")[:c]  # (c x E) token indices
    mask = np.zeros((tokens, experts), dtype=bool)
    mask[taken, np.arange(experts)[None, :]] = True
    out: np.ndarray = np.where(mask, np.arange(experts)[None, :], -1)
    return out


def random_hash_table(vocab_size: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed random hash: row ``id`` is a random permutation of the experts (int64)."""
    base = np.tile(np.arange(experts, dtype=np.int64), (vocab_size, 1))
    table: np.ndarray = rng.permuted(base, axis=1)
    return table


def hash_ranking(
    token_ids: np.ndarray, experts: int, table: np.ndarray | None = None
) -> np.ndarray:
    """Each token's experts in hash order (T x E, int64): ``table[id]``, or ``(id + j) % E``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if table is None:
        out: np.ndarray = (ids[:, None] + np.arange(experts)[None, :]) % experts
        return out
    if table.shape[1] != experts:
        raise ValueError(f"hash table has {table.shape[1]} columns, not experts={experts}")
    return np.asarray(table[ids], dtype=np.int64)


def combine_weights(
    probs: np.ndarray,
    ranking: np.ndarray,
    expert: np.ndarray,
    top_k: int,
    renormalize: bool,
    scale: float = 1.0,
) -> np.ndarray:
    """Combine weight of each slot (T x k): the router probability of the expert processing it.

    Weights are fixed by the router before capacity: with ``renormalize`` (Mixtral, and
    DeepSeek-V3's sigmoid ``norm_topk_prob``) each is divided by the sum of the token's
    top-k probabilities ``probs[t, ranking[t, :k]]``. A rerouted slot weighs the probability
    of the expert that actually processes it (same divisor); a dropped slot (expert -1)
    weighs 0 and the survivors are not renormalized (GShard, Switch). ``scale`` is
    DeepSeek's ``routed_scaling_factor``.
    """
    kept = expert >= 0
    w = np.take_along_axis(probs, np.where(kept, expert, 0).astype(np.int64), axis=1)
    if renormalize:
        denom = np.take_along_axis(probs, ranking[:, :top_k].astype(np.int64), axis=1)
        w = w / denom.sum(axis=1, keepdims=True)
    out: np.ndarray = np.where(kept, w * scale, 0).astype(probs.dtype)
    return out
