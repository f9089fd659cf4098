"""Compute and memory costs of the work inside a layer, on one device.

A kernel takes ``overhead + blend(t_compute, t_memory)``: FLOPs over achievable FLOP/s and
bytes over achievable bandwidth, blended by a p-norm (a hard max, the classic roofline, when
no measurement says otherwise). Achievable rates come either from a measured
:class:`~moesim.config.profile.DeviceProfile` (``moesim calibrate``) or, for devices
without one, from datasheet peaks times the catalog's stated efficiencies. In the
few-token regime every touched expert still streams its whole weights, so the experts are
memory-bound; large batches are compute-bound. Functions take numpy arrays of token counts
and return seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.config.hardware import AcceleratorSpec
from moesim.config.profile import DeviceProfile
from moesim.units import GB

ExpertKernel = Literal["grouped", "loop"]
_PROFILE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

#: the elementwise function behind each activation kind (applied to the gate branch if gated)
ACTIVATION_FUNCTION = {"swiglu": "silu", "geglu": "gelu", "gelu": "gelu", "relu": "relu"}


@dataclass(frozen=True)
class Roofline:
    """Achievable rates of one device for one datatype, and how its kernels behave."""

    flops_per_s: float
    """Matrix-product FLOP/s."""
    bytes_per_s: float
    """Bandwidth at which products stream their operands."""
    overhead_s: float
    """Fixed time of one kernel."""
    bytes_per_element: int
    memory_bytes_per_s: float
    """Bandwidth of elementwise and copy kernels (bytes read + written)."""
    smoothness: float = float("inf")
    """p-norm blend of compute and memory time (inf = hard max)."""
    gemm_overhead_s: float | None = None
    """Fixed time of one product (defaults to ``overhead_s``)."""
    m_tile: int = 1
    """Rows of a product are rounded up to a multiple of this (compute blocks)."""
    grouped_m_tile: int = 1
    """Rows per expert rounded up to a multiple of this in grouped kernels."""
    grouped_compute_factor: float = 1.0
    """Fraction of ``flops_per_s`` grouped kernels reach."""
    grouped_memory_factor: float = 1.0
    """Fraction of ``bytes_per_s`` grouped kernels reach."""
    grouped_overhead_s: float = 0.0
    """Extra fixed time of a grouped launch."""
    grouped_smoothness: float | None = None
    """p-norm blend of grouped kernels (None = ``smoothness``)."""
    layer_overhead_s: float = 0.0
    """Fixed routing glue per MoE layer (measured profiles only)."""
    routing_s_per_element: float = 0.0
    """Routing work per token x expert (measured profiles only)."""
    routing_s_per_slot: float = 0.0
    """Routing work per token x top_k slot (measured profiles only)."""
    activation_s_per_element: tuple[tuple[str, float], ...] = ()
    """Per-element compute time of activation functions (measured profiles only)."""
    gather_s_per_element: float = 0.0
    scatter_s_per_element: float = 0.0
    source: str = "datasheet"

    @classmethod
    def of(
        cls,
        acc: AcceleratorSpec,
        dtype: str,
        bytes_per_element: int,
        profile: DeviceProfile | None = None,
        launch: str = "eager",
    ) -> Roofline:
        """The device's cost model: its measured profile if any, else datasheet x efficiency.

        With ``launch="graph"`` and a profile that measured graph replays, kernels carry no
        launch cost of their own and the layer's fixed cost is the graph-fitted one.
        """
        profile = profile or acc.profile
        if profile is not None:
            g = profile.gemm
            # a profile measured in one datatype (bf16 on GPUs) prices products in another
            # by the datasheet's peak ratio (e.g. fp8 / bf16 = 2 on Hopper): an assumption,
            # stated in ``source``, until that datatype is measured
            scale = acc.peak_tflops.for_dtype(dtype) / acc.peak_tflops.for_dtype(
                _PROFILE_DTYPES.get(profile.dtype, profile.dtype)
            )
            graph = launch == "graph" and profile.graph_layer_overhead_us is not None
            kernel_s = 0.0 if graph else profile.kernel_overhead_us * 1e-6
            layer_us = (
                profile.graph_layer_overhead_us
                if graph and profile.graph_layer_overhead_us is not None
                else profile.layer_overhead_us
            )
            return cls(
                flops_per_s=g.flops_per_s * scale,
                bytes_per_s=g.bytes_per_s,
                overhead_s=kernel_s,
                bytes_per_element=bytes_per_element,
                memory_bytes_per_s=profile.memory_bytes_per_s,
                smoothness=g.smoothness,
                gemm_overhead_s=0.0 if graph else g.overhead_us * 1e-6,
                m_tile=g.m_tile,
                grouped_m_tile=g.grouped_m_tile,
                grouped_compute_factor=g.grouped_compute_factor,
                grouped_memory_factor=g.grouped_memory_factor,
                grouped_overhead_s=0.0 if graph else g.grouped_overhead_us * 1e-6,
                grouped_smoothness=g.grouped_smoothness,
                layer_overhead_s=layer_us * 1e-6,
                routing_s_per_element=profile.routing_ns_per_element * 1e-9,
                routing_s_per_slot=profile.routing_ns_per_slot * 1e-9,
                activation_s_per_element=tuple(
                    (k, v * 1e-9) for k, v in sorted(profile.activation_ns_per_element.items())
                ),
                gather_s_per_element=profile.gather_ns_per_element * 1e-9,
                scatter_s_per_element=profile.scatter_ns_per_element * 1e-9,
                source=f"profile: {profile.source}"
                + (
                    f"; {dtype} = {profile.dtype} rate x datasheet peak ratio {scale:.2f}"
                    if scale != 1.0
                    else ""
                ),
            )
        bw = acc.memory_bandwidth_gbps * GB * acc.efficiency.memory
        return cls(
            flops_per_s=acc.peak_tflops.for_dtype(dtype) * 1e12 * acc.efficiency.compute,
            bytes_per_s=bw,
            overhead_s=acc.kernel_overhead_us * 1e-6,
            bytes_per_element=bytes_per_element,
            memory_bytes_per_s=bw,
            source=f"datasheet x efficiency: {acc.efficiency.source}",
        )

    def _blend(
        self, t_compute: np.ndarray, t_memory: np.ndarray, p: float | None = None
    ) -> np.ndarray:
        p = self.smoothness if p is None else p
        if np.isinf(p) or p > 1e6:
            return np.maximum(t_compute, t_memory)
        hi = np.maximum(np.maximum(t_compute, t_memory), 1e-30)
        return np.asarray(hi * ((t_compute / hi) ** p + (t_memory / hi) ** p) ** (1.0 / p))

    def product_s(self, flops: np.ndarray | float, nbytes: np.ndarray | float) -> np.ndarray:
        """One matrix-product kernel of ``flops`` FLOPs streaming ``nbytes`` operand bytes."""
        overhead = self.overhead_s if self.gemm_overhead_s is None else self.gemm_overhead_s
        t_c = np.asarray(flops, dtype=float) / self.flops_per_s
        t_m = np.asarray(nbytes, dtype=float) / self.bytes_per_s
        return self._blend(t_c, t_m) + overhead

    def product_scalar_s(self, flops: float, nbytes: float) -> float:
        """:meth:`product_s` of one kernel in plain float arithmetic (the same operations in
        the same order, for hot loops over a handful of values)."""
        overhead = self.overhead_s if self.gemm_overhead_s is None else self.gemm_overhead_s
        t_c = flops / self.flops_per_s
        t_m = nbytes / self.bytes_per_s
        p = self.smoothness
        if p == float("inf") or p > 1e6:
            return (t_c if t_c >= t_m else t_m) + overhead
        hi = max(t_c, t_m, 1e-30)
        return hi * ((t_c / hi) ** p + (t_m / hi) ** p) ** (1.0 / p) + overhead

    def gemm_s(self, m: np.ndarray | int, k: int, n: int) -> np.ndarray:
        """``[m, k] @ [k, n]``: 2mkn FLOPs, reading both operands and writing the output."""
        m = np.asarray(m, dtype=float)
        b = self.bytes_per_element
        rows = np.ceil(m / self.m_tile) * self.m_tile
        return self.product_s(2.0 * rows * k * n, b * (m * k + k * n + m * n))

    def memory_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """A memory-bound kernel moving ``nbytes`` (reads + writes)."""
        return np.asarray(nbytes, dtype=float) / self.memory_bytes_per_s + self.overhead_s

    def routing_s(self, tokens: int, experts: int, top_k: int) -> float:
        """Scoring and top-k selection over a ``tokens x experts`` table, plus layer glue."""
        if tokens <= 0:
            return 0.0
        b = 4 * tokens * experts  # the score table is read and written in float32
        return float(
            self.memory_s(2 * b)
            + self.routing_s_per_element * tokens * experts
            + self.routing_s_per_slot * tokens * top_k
            + self.layer_overhead_s
        )

    def grouped_product_s(self, n: np.ndarray, k: int, out: int) -> float:
        """One grouped product over the experts with tokens ``n`` (all > 0)."""
        b = self.bytes_per_element
        rows = np.ceil(n / self.grouped_m_tile) * self.grouped_m_tile
        t_c = 2.0 * rows.sum() * k * out / (self.flops_per_s * self.grouped_compute_factor)
        nbytes = b * (n.sum() * k + len(n) * k * out + n.sum() * out)
        t_m = nbytes / (self.bytes_per_s * self.grouped_memory_factor)
        overhead = self.overhead_s if self.gemm_overhead_s is None else self.gemm_overhead_s
        blend = self._blend(np.asarray(t_c), np.asarray(t_m), self.grouped_smoothness)
        return float(blend) + overhead + (self.grouped_overhead_s)

    def activation_s(self, tokens: np.ndarray | float, d_ff: int, activation: str) -> np.ndarray:
        """The activation between the projections for ``tokens`` rows of width ``d_ff``:
        its memory traffic plus its measured per-element compute."""
        gated = activation in ("swiglu", "geglu")
        b = self.bytes_per_element
        n = np.asarray(tokens, dtype=float)
        traffic = self.memory_s(b * n * d_ff * (3 if gated else 2))
        per = dict(self.activation_s_per_element).get(ACTIVATION_FUNCTION[activation], 0.0)
        return np.asarray(traffic + per * n * d_ff)

    def gather_s(self, rows: int, width: int) -> float:
        """Gather ``rows`` rows of ``width`` into an expert-sorted buffer (dispatch permute)."""
        if rows <= 0:
            return 0.0
        b = self.bytes_per_element
        return float(self.memory_s(2 * b * rows * width)) + self.gather_s_per_element * rows * width

    def scatter_s(self, rows: int, width: int) -> float:
        """Weighted scatter-add of ``rows`` expert outputs back to their tokens (combine)."""
        if rows <= 0:
            return 0.0
        b = self.bytes_per_element
        return float(self.memory_s(3 * b * rows * width)) + (
            self.scatter_s_per_element * rows * width
        )

    def grouped_ffn_s(
        self,
        tokens_per_expert: np.ndarray,
        d_model: int,
        d_ff: int,
        activation: str,
        kernel: ExpertKernel = "grouped",
    ) -> float:
        """The experts of one device: up (and gate) projection, activation, down projection.

        Experts that received no token are skipped, as grouped-GEMM kernels and per-expert
        loops both do; each expert that did must stream its full weights. ``d_ff`` is this
        device's shard. ``kernel`` says whether each projection is one grouped kernel over
        all experts or a loop of per-expert products.
        """
        n = np.asarray(tokens_per_expert, dtype=float)
        n = n[n > 0]
        if not n.size:
            return 0.0
        up_n = (2 if activation in ("swiglu", "geglu") else 1) * d_ff
        if kernel == "loop":
            up = float(self.gemm_s(n, d_model, up_n).sum())
            down = float(self.gemm_s(n, d_ff, d_model).sum())
            act = float(self.activation_s(n, d_ff, activation).sum())
            return up + act + down
        act = float(self.activation_s(n.sum(), d_ff, activation))
        return (
            self.grouped_product_s(n, d_model, up_n)
            + act
            + self.grouped_product_s(n, d_ff, d_model)
        )

    def dense_ffn_s(self, tokens: int, d_model: int, d_ff: int, activation: str) -> float:
        """A dense FFN (e.g. shared experts) over ``tokens`` tokens."""
        if tokens <= 0 or d_ff <= 0:
            return 0.0
        up_n = (2 if activation in ("swiglu", "geglu") else 1) * d_ff
        return float(
            self.gemm_s(tokens, d_model, up_n)
            + self.activation_s(tokens, d_ff, activation)
            + self.gemm_s(tokens, d_ff, d_model)
        )
