"""Auxiliary quantities of a routed layer: load, balancing loss, z-loss, entropy, drops.

- Switch load-balancing loss (Fedus, Zoph & Shazeer 2021, "Switch Transformers", eqs. 4-6):
  ``N * sum_i f_i * P_i`` with ``N`` experts, ``f_i`` the fraction of tokens whose first
  choice is expert i (Switch: ``argmax p(x) = i``; here the router's first-ranked expert,
  which is the argmax unless a selection bias or group limit intervenes; counted before
  capacity) and ``P_i`` the mean router probability of expert i. It is returned without the
  coefficient alpha; it equals 1 under perfectly uniform routing and grows with imbalance.
  Sigmoid scores are first normalized to sum to 1 per token (as DeepSeek-V3's
  sequence-wise balance loss does).
- Router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5): ``mean_t logsumexp(logits_t)^2``, on the
  logits the router scored (noise included when noisy gating is on).
- Router entropy: mean over tokens of ``-sum_i p_i log p_i`` (probabilities normalized as
  for the balancing loss; 0 log 0 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.reference.functional import logsumexp


@dataclass(frozen=True, eq=False)
class AuxMetrics:
    """Aux quantities returned with a layer's output."""

    load: np.ndarray
    """int64 (E,): slots each expert processed (after capacity)."""
    load_balancing_loss: float
    """Switch loss N * sum_i f_i P_i (no alpha); 1.0 when routing is uniform."""
    z_loss: float
    """ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2."""
    entropy: float
    """Mean over tokens of the router distribution's entropy, nats."""
    dropped_slots: int
    """Token-choice slots over capacity that fell to the residual (0 for expert choice)."""
    dropped_tokens: int
    """Tokens processed by no expert at all (residual and shared experts only)."""
    rerouted: int
    """Slots processed by an expert other than their original choice."""


def normalized(probs: np.ndarray) -> np.ndarray:
    """Router probabilities rescaled to sum to 1 per token (a no-op for softmax)."""
    out: np.ndarray = probs / probs.sum(axis=1, keepdims=True)
    return out


def load_balancing_loss(probs: np.ndarray, first_choice: np.ndarray) -> float:
    """Switch Transformer balancing loss ``N * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    ``probs`` (T x N) are router probabilities (normalized here), ``first_choice`` (T,) each
    token's first-ranked expert. 0.0 for no tokens.
    """
    tokens, experts = probs.shape
    if tokens == 0:
        return 0.0
    f = np.bincount(first_choice.astype(np.int64), minlength=experts) / tokens
    p = normalized(probs).mean(axis=0)
    return float(experts * np.dot(f, p))


def z_loss(logits: np.ndarray) -> float:
    """ST-MoE router z-loss ``mean_t (log sum_i exp(logits_ti))^2`` (Zoph et al. 2022, eq. 5)."""
    if logits.shape[0] == 0:
        return 0.0
    return float(np.mean(logsumexp(logits, axis=1) ** 2))


def router_entropy(probs: np.ndarray) -> float:
    """Mean over tokens of the entropy (nats) of the normalized router distribution."""
    if probs.shape[0] == 0:
        return 0.0
    p = normalized(probs)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)
    return float(-plogp.sum(axis=1).mean())
