"""Expert FFN weights and their application: gated (SwiGLU, GeGLU) and plain (GeLU, ReLU).

A gated expert computes ``down(act(x @ W_gate) * (x @ W_up))`` (Shazeer 2020, "GLU Variants
Improve Transformer"); a plain one ``down(act(x @ W_up))``. Weights of ``n`` experts are
stacked: ``w_up`` and ``w_gate`` are (n, d_model, d_ff), ``w_down`` is (n, d_ff, d_model).
No biases (none of the catalog's models has FFN biases).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.reference.functional import gelu, relu, silu

Activation = Literal["swiglu", "geglu", "gelu", "relu"]

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "swiglu": silu,
    "geglu": gelu,
    "gelu": gelu,
    "relu": relu,
}
"""The elementwise function of each activation kind (applied to the gate branch if gated)."""

GATED: frozenset[str] = frozenset({"swiglu", "geglu"})


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """The stacked weights of ``n`` experts of one kind (routed or shared)."""

    w_up: np.ndarray
    """(n, d_model, d_ff) up projection."""
    w_down: np.ndarray
    """(n, d_ff, d_model) down projection."""
    w_gate: np.ndarray | None
    """(n, d_model, d_ff) gate projection of gated activations, else None."""
    activation: Activation

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        n, d, f = self.w_up.shape
        if self.w_down.shape != (n, f, d):
            raise ValueError(f"w_down shape {self.w_down.shape} != {(n, f, d)}")
        if (self.w_gate is not None) != self.gated:
            raise ValueError(f"activation {self.activation!r}: w_gate presence is wrong")
        if self.w_gate is not None and self.w_gate.shape != self.w_up.shape:
            raise ValueError(f"w_gate shape {self.w_gate.shape} != {self.w_up.shape}")

    @property
    def n(self) -> int:
        """Number of experts."""
        return int(self.w_up.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w_up.shape[1])

    @property
    def d_ff(self) -> int:
        return int(self.w_up.shape[2])

    @property
    def gated(self) -> bool:
        """Whether the activation is gated (three matrices)."""
        return self.activation in GATED

    @property
    def dtype(self) -> np.dtype:
        return self.w_up.dtype


def init_experts(
    rng: np.random.Generator,
    n: int,
    d_model: int,
    d_ff: int,
    activation: Activation,
    dtype: type[np.floating] | np.dtype = np.float64,
) -> ExpertWeights:
    """``n`` experts with N(0, 1/fan_in) weights drawn from ``rng`` (up, gate, down order)."""
    w_up = rng.standard_normal((n, d_model, d_ff)) / np.sqrt(d_model)
    w_gate = (
        rng.standard_normal((n, d_model, d_ff)) / np.sqrt(d_model) if activation in GATED else None
    )
    w_down = rng.standard_normal((n, d_ff, d_model)) / np.sqrt(d_ff)
    return ExpertWeights(
        w_up.astype(dtype),
        w_down.astype(dtype),
        None if w_gate is None else w_gate.astype(dtype),
        activation,
    )


def ffn(weights: ExpertWeights, e: int, x: np.ndarray) -> np.ndarray:
    """Expert ``e`` applied to the rows of ``x`` (m x d_model) -> (m x d_model)."""
    act = ACTIVATIONS[weights.activation]
    up = x @ weights.w_up[e]
    hidden = act(x @ weights.w_gate[e]) * up if weights.w_gate is not None else act(up)
    out: np.ndarray = hidden @ weights.w_down[e]
    return out


def every_expert(weights: ExpertWeights, x: np.ndarray) -> np.ndarray:
    """Every expert on every row of ``x`` (T x d_model) -> (n, T, d_model)."""
    return np.stack([ffn(weights, e, x) for e in range(weights.n)])
