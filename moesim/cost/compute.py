"""Compute and memory costs of the work inside a layer, on one device.

A kernel takes ``overhead + blend(t_compute, t_memory)``: FLOPs over achievable FLOP/s and
bytes over achievable bandwidth, blended by a p-norm (a hard max, the classic roofline, when
no measurement says otherwise). Achievable rates come either from a measured
:class:`~moesim.config.profile.DeviceProfile` (``moesim calibrate``) or, for devices
without one, from datasheet peaks times the catalog's stated efficiencies. In the
few-token regime every touched expert still streams its whole weights, so the experts are
memory-bound; large batches are compute-bound. Functions take numpy arrays of token counts
and return seconds.

A profile with a ``launch`` fit also prices a whole MoE layer as a launch pipeline
(:class:`LaunchPipeline`): the host issues the layer's kernels one by one while the device
runs them, so an eager layer takes max(host issue, device time) rather than their sum, a
CUDA-graph replay only its device time, and a per-expert loop restarts the pipeline after
reading the per-expert counts on the host. The layer simulation charges the gate, shared
experts and combine as separate steps; :meth:`Roofline.grouped_ffn_s`, given the layer,
returns the pipeline's layer time minus those charges, so the steps add up to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from moesim.config.hardware import AcceleratorSpec
from moesim.config.model import ModelConfig
from moesim.config.profile import DeviceProfile
from moesim.units import GB

ExpertKernel = Literal["grouped", "loop"]
_PROFILE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

#: the elementwise function behind each activation kind (applied to the gate branch if gated)
ACTIVATION_FUNCTION = {"swiglu": "silu", "geglu": "gelu", "gelu": "gelu", "relu": "relu"}
_GATED = ("swiglu", "geglu")


def activation_kernels(activation: str) -> int:
    """Elementwise kernels of an FFN's activation: the function, and for gated ones the
    product with the other branch."""
    return 2 if activation in _GATED else 1


@dataclass(frozen=True)
class LaunchPipeline:
    """An MoE layer's kernels as a launch pipeline: the host issues them, the device runs
    them (:class:`moesim.config.profile.LaunchFit`, in seconds).

    Kernel counts follow the model's structure: the routing glue (``glue_kernels``), the
    router product, the dispatch gather and combine scatter; per FFN application (the
    grouped experts, each expert of a loop, the shared experts) two products and
    :func:`activation_kernels`; the shared experts' output is added (one more kernel).
    Products cost the device their time in ``device`` (the GEMM microbenchmarks fitted as
    max(host issue, device time)); every other kernel its memory traffic plus ``floor_s``.
    """

    graph: bool
    """CUDA-graph replay: no host issue, kernels cost only device time."""
    device: Roofline
    """Device time of products (with their own fixed device time) and memory traffic."""
    kernel_device_s: float
    eager_device_s: float
    glue_kernels: int
    glue_host_s: float
    product_host_s: float
    """Host issue of a product that allocates its output."""
    grouped_host_s: float
    """Host issue of a grouped product."""
    kernel_host_s: float
    """Host issue of an elementwise kernel."""
    loop_product_host_s: float
    """Host issue of a product into an output slice inside a per-expert loop."""
    host_sync_s: float

    def glue_kernel_count(self, top_k: int) -> int:
        """Kernels of the routing glue: top-k > 1 also sorts each token's k choices."""
        return self.glue_kernels + (1 if top_k > 1 else 0)

    @property
    def floor_s(self) -> float:
        """Device time every kernel but a product adds beyond its memory traffic."""
        return self.kernel_device_s + (0.0 if self.graph else self.eager_device_s)

    @classmethod
    def of(
        cls, profile: DeviceProfile, graph: bool, rates: Roofline, flops_scale: float
    ) -> LaunchPipeline | None:
        """The profile's launch pipeline (None without a ``launch`` fit); ``rates``: the
        profile's roofline, whose products take the fitted device model (FLOP rate times
        ``flops_scale``, another datatype's peak ratio) and no fixed time but the device's."""
        fit = profile.launch
        if fit is None:
            return None
        us, g = 1e-6, fit.device_gemm
        device = replace(
            rates,
            flops_per_s=g.flops_per_s * flops_scale,
            bytes_per_s=g.bytes_per_s,
            overhead_s=0.0,
            smoothness=g.smoothness,
            gemm_overhead_s=g.overhead_us * us,
            m_tile=g.m_tile,
            grouped_m_tile=g.grouped_m_tile,
            grouped_compute_factor=g.grouped_compute_factor,
            grouped_memory_factor=g.grouped_memory_factor,
            grouped_overhead_s=g.grouped_overhead_us * us,
            grouped_smoothness=g.grouped_smoothness,
            layer_overhead_s=0.0,
            pipeline=None,
        )
        return cls(
            graph=graph,
            device=device,
            kernel_device_s=fit.kernel_device_us * us,
            eager_device_s=fit.eager_device_us * us,
            glue_kernels=fit.glue_kernels,
            glue_host_s=fit.glue_host_us * us,
            product_host_s=fit.product_host_us * us,
            grouped_host_s=fit.grouped_host_us * us,
            kernel_host_s=profile.kernel_overhead_us * us,
            loop_product_host_s=fit.loop_product_host_us * us,
            host_sync_s=fit.host_sync_us * us,
        )


def flow_shop_s(host_s: np.ndarray, device_s: np.ndarray) -> float:
    """Makespan of jobs issued by the host one after another and run by the device in the
    same order, each starting once issued and once the previous one ran: the largest, over
    the job j where the device last waited, of the host time up to j plus the device time
    from j on (a two-stage flow shop)."""
    if not len(host_s):
        return 0.0
    return float(np.max(np.cumsum(host_s) + np.cumsum(device_s[::-1])[::-1]))


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
    pipeline: LaunchPipeline | None = None
    """The MoE layer's launch pipeline (measured profiles with a ``launch`` fit only)."""

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
            graph = launch == "graph" and (
                profile.launch is not None or profile.graph_layer_overhead_us is not None
            )
            kernel_s = 0.0 if graph else profile.kernel_overhead_us * 1e-6
            layer_us = (
                profile.graph_layer_overhead_us
                if graph and profile.graph_layer_overhead_us is not None
                else profile.layer_overhead_us
            )
            rates = cls(
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
            return replace(rates, pipeline=LaunchPipeline.of(profile, graph, rates, scale))
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

    def gemm_s(self, m: np.ndarray | int, k: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
        """``[m, k] @ [k, n]``: 2mkn FLOPs, reading both operands and writing the output
        (element-wise over arrays)."""
        m = np.asarray(m, dtype=float)
        b = self.bytes_per_element
        rows = np.ceil(m / self.m_tile) * self.m_tile
        return self.product_s(2.0 * rows * k * n, b * (m * k + k * n + m * n))

    def memory_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """A memory-bound kernel moving ``nbytes`` (reads + writes)."""
        return np.asarray(nbytes, dtype=float) / self.memory_bytes_per_s + self.overhead_s

    def routing_s(self, tokens: int, experts: int, top_k: int) -> float:
        """Scoring and top-k selection over a ``tokens x experts`` table, plus layer glue
        (with a launch pipeline: its kernels' device time, eagerly at least their host
        issue, the glue being host-bound)."""
        if tokens <= 0:
            return 0.0
        b = 4 * tokens * experts  # the score table is read and written in float32
        pl = self.pipeline
        if pl is None:
            glue = self.layer_overhead_s
        else:
            glue = pl.glue_kernel_count(top_k) * pl.floor_s
            glue = glue if pl.graph else max(glue, pl.glue_host_s)
        return float(
            self.memory_s(2 * b)
            + self.routing_s_per_element * tokens * experts
            + self.routing_s_per_slot * tokens * top_k
            + glue
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
        *,
        model: ModelConfig | None = None,
        tokens: int | None = None,
        slots: int | None = None,
    ) -> float:
        """The experts of one device: up (and gate) projection, activation, down projection.

        Experts that received no token are skipped, as grouped-GEMM kernels and per-expert
        loops both do; each expert that did must stream its full weights. ``d_ff`` is this
        device's shard. ``kernel`` says whether each projection is one grouped kernel over
        all experts or a loop of per-expert products.

        Given the layer (``model``, and the ``tokens`` this device routes and the ``slots``
        it dispatches: by default the slots its experts received) and a launch pipeline,
        the experts' step also carries the layer's launch pipeline: it returns
        :meth:`moe_layer_s` minus what the layer simulation charges for the device's gate,
        shared experts and combine (:meth:`moe_rest_s`), so that the steps add up to the
        pipeline's time (the overlap of host issue and device work is credited here). With
        no tokens and no slots (expert parallelism: all-to-alls separate the steps) the
        experts' step is a pipeline of its own.
        """
        n = np.asarray(tokens_per_expert, dtype=float)
        n = n[n > 0]
        if not n.size:
            return 0.0
        if self.pipeline is not None and model is not None:
            slots = int(n.sum()) if slots is None else slots
            tokens = -(-slots // model.top_k) if tokens is None else tokens
            total = self.moe_layer_s(n, tokens, slots, model, d_ff, kernel)
            return max(0.0, total - self.moe_rest_s(tokens, slots, model))
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

    def moe_rest_s(self, tokens: int, slots: int, model: ModelConfig) -> float:
        """What the layer simulation (:func:`moesim.engine.moe_layer.run_layer`) charges a
        device for its gate (router product, routing, gather), its shared experts and its
        combine scatter."""
        d = model.d_model
        rest = float(self.gemm_s(tokens, d, model.experts)) if tokens else 0.0
        rest += self.routing_s(tokens, model.experts, model.top_k) + self.gather_s(slots, d)
        if model.shared_experts and tokens:
            width = model.shared_d_ff * model.shared_experts
            rest += self.dense_ffn_s(tokens, d, width, model.activation)
        return rest + (self.scatter_s(slots, d) if slots else 0.0)

    def moe_layer_s(
        self,
        loads: np.ndarray,
        tokens: int,
        slots: int,
        model: ModelConfig,
        d_ff: int,
        kernel: ExpertKernel = "grouped",
    ) -> float:
        """One device's MoE layer as a launch pipeline: its gate (router product, routing
        glue, gather), shared experts, experts (``loads``: rows of each touched local
        expert) and combine scatter.

        Products cost the device their fitted device time; every other kernel its memory
        traffic plus the pipeline's floor (the activation as unfused kernels: a gated one
        reads both halves and writes twice); eagerly, the host issues each kernel. CUDA-graph
        replay: the device time. Eager grouped experts: max(host issue, device time), the
        host running ahead while the device streams. Eager per-expert loop: the host reads
        the counts (``host_sync_s``; the device drains), then issues each expert's kernels
        while the device runs the previous ones (a flow shop), and the rest of the layer
        overlaps as before.
        """
        pl = self.pipeline
        if pl is None:
            raise ValueError("moe_layer_s needs a profile with a launch fit")
        dev, floor, b = pl.device, pl.floor_s, self.bytes_per_element
        d, act = model.d_model, model.activation
        n_act = activation_kernels(act)
        up = (2 if act in _GATED else 1) * d_ff

        def act_s(rows: np.ndarray | float, width: int) -> np.ndarray:
            passes = 5 if act in _GATED else 2  # silu(h1): read + write; x h2: 2 reads + write
            per = dict(dev.activation_s_per_element).get(ACTIVATION_FUNCTION[act], 0.0)
            n = np.asarray(rows, dtype=float) * width
            return np.asarray(n * (passes * b / dev.memory_bytes_per_s + per) + n_act * floor)

        # the rest of the device's layer (a rank without tokens routes nothing): router
        # product, glue, gather, scatter, shared experts
        dev_rest = host_rest = 0.0
        if tokens:
            dev_rest += float(dev.gemm_s(tokens, d, model.experts))
            dev_rest += dev.routing_s(tokens, model.experts, model.top_k)
            dev_rest += pl.glue_kernel_count(model.top_k) * floor
            host_rest += pl.product_host_s + pl.glue_host_s
        if slots:
            dev_rest += dev.gather_s(slots, d) + dev.scatter_s(slots, d) + 2 * floor
            host_rest += 2 * pl.kernel_host_s
        if model.shared_experts and tokens:
            width = model.shared_d_ff * model.shared_experts
            dev_rest += float(
                dev.gemm_s(tokens, d, (2 if act in _GATED else 1) * width)
                + act_s(tokens, width)
                + dev.gemm_s(tokens, width, d)
                + dev.memory_s(3 * b * tokens * d)  # the routed and shared outputs added
                + floor
            )
            host_rest += 2 * pl.product_host_s + (n_act + 1) * pl.kernel_host_s
        if kernel == "loop":
            per = np.asarray(dev.gemm_s(loads, d, up) + act_s(loads, d_ff))
            per = per + np.asarray(dev.gemm_s(loads, d_ff, d))
            if pl.graph:
                return dev_rest + float(per.sum())
            issue = np.full(len(loads), pl.product_host_s + pl.loop_product_host_s)
            issue += n_act * pl.kernel_host_s
            return pl.host_sync_s + max(
                flow_shop_s(issue, per) + dev_rest, float(issue.sum()) + host_rest
            )
        dev_experts = (
            dev.grouped_product_s(loads, d, up)
            + float(act_s(loads.sum(), d_ff))
            + dev.grouped_product_s(loads, d_ff, d)
        )
        if pl.graph:
            return dev_rest + dev_experts
        host_experts = 2 * pl.grouped_host_s + n_act * pl.kernel_host_s
        return max(dev_rest + dev_experts, host_rest + host_experts)
