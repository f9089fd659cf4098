"""Elementwise and reduction functions of the reference layer, numerically stable, pure numpy.

Every function keeps the floating dtype of its input (float32 stays float32).
"""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(z) / sum(exp(z)) along ``axis``, shifted by the max for stability."""
    shifted = z - z.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / e.sum(axis=axis, keepdims=True)
    return out


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(z))) along ``axis`` (the axis is removed)."""
    m = z.max(axis=axis, keepdims=True)
    out: np.ndarray = (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), computed as exp(-softplus(-z)) so it never overflows."""
    out: np.ndarray = np.exp(-np.logaddexp(np.zeros((), dtype=z.dtype), -z))
    return out


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z))."""
    out: np.ndarray = np.logaddexp(np.zeros((), dtype=z.dtype), z)
    return out


def silu(z: np.ndarray) -> np.ndarray:
    """SiLU / swish: z * sigmoid(z) (the gate activation of SwiGLU)."""
    out: np.ndarray = z * sigmoid(z)
    return out


def gelu(z: np.ndarray) -> np.ndarray:
    """GeLU, tanh approximation (Hendrycks & Gimpel 2016; ``gelu_pytorch_tanh``).

    numpy has no ``erf``; the tanh form differs from the exact GeLU by < 1e-3 and is what
    GeGLU models such as Gemma use.
    """
    c = float(np.sqrt(2.0 / np.pi))  # a Python float keeps z's dtype (NEP 50)
    out: np.ndarray = 0.5 * z * (1.0 + np.tanh(c * (z + 0.044715 * z**3)))
    return out


def relu(z: np.ndarray) -> np.ndarray:
    """max(z, 0)."""
    out: np.ndarray = np.maximum(z, 0)
    return out
