"""Prefill and decode tokens of a routing trace, told apart by its ``step`` field: the
tokens of one step ran in one iteration, so a step of at most ``decode_step_tokens`` tokens
(default 1: one token per sequence of a batch-1 decode) is a decode step, a larger one a
prompt's prefill. ``moesim routing fit --phases`` fits one logits model to each
(docs/routing.md)."""

from __future__ import annotations

import numpy as np


def decode_mask(step: np.ndarray, decode_step_tokens: int = 1) -> np.ndarray:
    """bool [tokens]: which tokens ran in a decode step (a step of at most
    ``decode_step_tokens`` tokens)."""
    _, inverse, counts = np.unique(np.asarray(step), return_inverse=True, return_counts=True)
    return np.asarray(counts[inverse] <= decode_step_tokens)
