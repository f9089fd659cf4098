"""Compute and memory costs of the work inside a layer, on one device: a roofline.

A kernel takes max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) plus a fixed
launch overhead. Achievable rates are the datasheet peaks times the device's measured (or
stated) efficiencies from the catalog, so the few-token regime, where every touched expert
must still stream its whole weights from HBM, is memory-bound, and large batches are
compute-bound. All functions take numpy arrays of token counts and return seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.hardware import AcceleratorSpec


@dataclass(frozen=True)
class Roofline:
    """Achievable rates of one device for one datatype."""

    flops_per_s: float
    bytes_per_s: float
    overhead_s: float
    bytes_per_element: int

    @classmethod
    def of(cls, acc: AcceleratorSpec, dtype: str, bytes_per_element: int) -> Roofline:
        return cls(
            flops_per_s=acc.peak_tflops.for_dtype(dtype) * 1e12 * acc.efficiency.compute,
            bytes_per_s=acc.memory_bandwidth_gbps * 1e9 * acc.efficiency.memory,
            overhead_s=acc.kernel_overhead_us * 1e-6,
            bytes_per_element=bytes_per_element,
        )

    def kernel_s(self, flops: np.ndarray | float, nbytes: np.ndarray | float) -> np.ndarray:
        """One kernel: the slower of its compute and its memory traffic, plus launch cost."""
        return (
            np.maximum(np.asarray(flops) / self.flops_per_s, np.asarray(nbytes) / self.bytes_per_s)
            + self.overhead_s
        )

    def gemm_s(self, m: np.ndarray | int, k: int, n: int) -> np.ndarray:
        """``[m, k] @ [k, n]``: 2mkn FLOPs, reading both operands and writing the output."""
        m = np.asarray(m, dtype=float)
        b = self.bytes_per_element
        return self.kernel_s(2.0 * m * k * n, b * (m * k + k * n + m * n))

    def memory_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """A memory-bound kernel moving ``nbytes`` (reads + writes)."""
        return self.kernel_s(0.0, nbytes)

    def grouped_ffn_s(
        self, tokens_per_expert: np.ndarray, d_model: int, d_ff: int, gated: bool
    ) -> float:
        """The experts of one device as grouped GEMMs (one kernel per projection).

        Experts that received no token are skipped, as grouped-GEMM kernels do; each
        expert that did must stream its full weights. ``d_ff`` is this device's shard.
        """
        n = np.asarray(tokens_per_expert, dtype=float)
        used = n > 0
        if not used.any():
            return 0.0
        b = self.bytes_per_element
        t = n[used].sum()
        up_n = (2 if gated else 1) * d_ff
        up = self.kernel_s(
            2.0 * t * d_model * up_n, b * (t * d_model + used.sum() * d_model * up_n + t * up_n)
        )
        act = self.memory_s(b * t * (up_n + d_ff))
        down = self.kernel_s(
            2.0 * t * d_ff * d_model, b * (t * d_ff + used.sum() * d_ff * d_model + t * d_model)
        )
        return float(up + act + down)

    def dense_ffn_s(self, tokens: int, d_model: int, d_ff: int, gated: bool) -> float:
        """A dense FFN (e.g. a shared expert) over ``tokens`` tokens."""
        if tokens <= 0 or d_ff <= 0:
            return 0.0
        return self.grouped_ffn_s(np.array([tokens]), d_model, d_ff, gated)
