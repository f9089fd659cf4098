"""A measured device profile: the cost model's parameters fitted on real execution.

Written by ``moesim calibrate`` (numpy on a host CPU, torch on a CUDA GPU) and named by a
scenario (``cluster: {preset: ..., profile: path}``) or by an accelerator preset. When a
profile is present it replaces the datasheet-peak x efficiency roofline of that device.

The GEMM model: ``t = overhead + (t_compute**p + t_memory**p) ** (1/p)`` with
``t_compute = 2 M K N / flops_per_s`` (M rounded up to a multiple of ``m_tile``; per
expert, to ``grouped_m_tile``, in grouped kernels) and
``t_memory = operand bytes / bytes_per_s``: a roofline whose corner is smoothed by ``p``
(a hard max when p is large), fitted by least squares on log time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.step_kernels import StepKernelFit


class GemmFit(Frozen):
    """Fitted parameters of matrix products on the device."""

    flops_per_s: float = Field(gt=0)
    """Achievable FLOP/s of large, well-shaped products."""
    bytes_per_s: float = Field(gt=0)
    """Effective bandwidth at which a product streams its operands."""
    overhead_us: float = Field(ge=0)
    """Fixed time per product (launch and setup)."""
    smoothness: float = Field(ge=1)
    """p of the p-norm that blends the compute and memory times."""
    m_tile: int = Field(default=1, ge=1)
    """Rows are computed in blocks of this many: a product of M rows costs ceil(M/m_tile)
    blocks of compute."""
    grouped_m_tile: int = Field(default=1, ge=1)
    """The same for each expert's rows inside a grouped kernel."""
    grouped_compute_factor: float = Field(default=1.0, gt=0)
    """Grouped-GEMM kernels reach this fraction of ``flops_per_s`` (ragged groups keep them
    from a plain product's efficiency); fitted on grouped-GEMM measurements."""
    grouped_memory_factor: float = Field(default=1.0, gt=0)
    """... and this fraction of ``bytes_per_s`` when streaming many experts' weights."""
    grouped_overhead_us: float = Field(default=0.0, ge=0)
    """Extra fixed time of a grouped launch over a plain product's (group setup)."""
    grouped_smoothness: float | None = Field(default=None, ge=1)
    """p-norm blend for grouped kernels (None = the plain products' ``smoothness``)."""


class CollectiveFit(Frozen):
    """alpha-beta fit of one collective at one world size: t = alpha + bytes / bandwidth."""

    op: Literal["all_to_all", "all_reduce", "all_gather"]
    world: int = Field(ge=2)
    alpha_us: float = Field(ge=0)
    """Fixed cost of one call."""
    bandwidth_gbps: float = Field(gt=0)
    """Bytes per rank (the buffer each rank holds) per second, GB/s."""
    source: str | None = None
    """Where this fit was measured, when not in the profile's own ``source``."""


class FitQuality(Frozen):
    """How well the fitted model reproduces the measurements it was fitted on."""

    samples: int = Field(ge=0)
    median_abs_error: float = Field(ge=0)
    """Median of |predicted / measured - 1|."""
    worst_abs_error: float = Field(ge=0)


class LaunchFit(Frozen):
    """How an MoE layer's kernels reach the device: a launch pipeline.

    The host issues the layer's kernels one by one and the device runs them in order; in
    eager mode the two overlap, so a layer takes about max(host issue, device time) (the
    host runs ahead while the device streams weights, and the device idles while the host
    issues small kernels); a CUDA-graph replay has no host issue at all. Every kernel costs
    the device its roofline time: a product its time in ``device_gemm``, any other kernel
    its memory traffic plus ``kernel_device_us``. A per-expert loop first reads the
    per-expert row counts on the host (a device-to-host synchronisation, which drains the
    queue: the host's lead is lost) and then issues each touched expert's kernels, so each
    expert costs about max(its host issue, its device time). Host issue times: a product
    ``product_host_us``, a grouped product ``grouped_host_us``, an elementwise kernel
    ``DeviceProfile.kernel_overhead_us`` (the measured launch rate), a product writing into
    a slice inside a per-expert loop ``loop_product_host_us``. Kernel counts come from the
    model's structure (see :class:`moesim.cost.compute.LaunchPipeline`)."""

    device_gemm: GemmFit
    """Products' device time: the GEMM and grouped-GEMM microbenchmarks (run back to back,
    eagerly) fitted as max(host issue, device time) rather than their sum; ``overhead_us``
    is here the device's fixed time of a product (ramp-up, tail, launch latency) and
    ``grouped_overhead_us`` a grouped product's extra."""
    device_gemm_fit: FitQuality | None = None
    """Fit quality of max(host issue, device time) on the GEMM measurements."""
    product_host_us: float = Field(ge=0)
    """Host issue time of a product (``x @ w``): the GEMM microbenchmarks' launch-bound
    floor in that fit."""
    grouped_host_us: float = Field(ge=0)
    """Host issue time of a grouped product, from the grouped-GEMM microbenchmarks."""

    kernel_device_us: float = Field(ge=0)
    """Device time of one kernel other than a product beyond its memory traffic (launch
    latency, ramp-up, tail), fitted on the calibration model's CUDA-graph layers with the
    fewest tokens."""
    eager_device_us: float = Field(ge=0)
    """Extra device time of such a kernel when launched eagerly rather than replayed from
    a graph (products: measured eagerly already): the median (eager - graph) per kernel of
    the calibration model's layers with the most tokens, where the device is the
    bottleneck."""
    glue_kernels: int = Field(ge=0)
    """Kernels of a layer's routing glue with top-1 routing, besides the router product,
    the gather and the combine scatter: softmax, top-k, weight normalisation and casts; the
    permutation's sort, index arithmetic and per-expert offsets; the combine's weight
    gather, zero fill and weighting (top-k > 1 adds a sort of each token's choices).
    Counted with ``torch.profiler`` in the measured layer (``python3 -m
    moesim.calibrate.torch_kernels``), not fitted."""
    glue_host_us: float = Field(ge=0)
    """Host issue time of that glue per layer (eager): what the calibration layers with
    the fewest tokens (host-bound) leave after the products' and kernels' issue times."""
    loop_product_host_us: float = Field(ge=0)
    """Host issue time of one product in a per-expert loop (row slices, ``torch.mm`` into
    the output slice), fitted on the per-expert-loop microbenchmarks (``grouped_gemm``
    records with ``impl: loop``) as max(issue x touched experts, device time)."""
    host_sync_us: float = Field(ge=0)
    """Cost of the host's read of the per-expert counts before a per-expert loop, beyond
    the drained pipeline itself: the smallest residual of the calibration model's loop
    layers (host interference only adds time)."""
    source: str = Field(min_length=1)
    """Which records each value was fitted on."""


class DeviceProfile(Frozen):
    """Cost-model parameters of one device and software stack, measured."""

    device: str = Field(min_length=1)
    """What was measured (e.g. 'NVIDIA H100 80GB HBM3' or the host CPU model)."""
    backend: Literal["numpy", "torch"]
    """The software that ran the measurements."""
    dtype: str = Field(min_length=1)
    """Datatype of the products measured (bf16 on GPUs, float32 on numpy)."""
    source: str = Field(min_length=1)
    """The measurement: file, date and setup, and the command that produced this profile."""
    gemm: GemmFit
    memory_bytes_per_s: float = Field(gt=0)
    """Streaming bandwidth of elementwise / copy kernels (bytes read + written per second)."""
    kernel_overhead_us: float = Field(ge=0)
    """Fixed time of one small kernel (launch or call overhead)."""
    layer_overhead_us: float = Field(default=0.0, ge=0)
    """Fixed time per MoE layer for routing glue (top-k, sort, index building), fitted on
    measured layers of the calibration set, run eagerly (one launch per kernel). Used only
    by profiles without a ``launch`` fit (which replaces it)."""
    graph_layer_overhead_us: float | None = Field(default=None, ge=0)
    """The same for layers replayed as CUDA graphs, where kernels carry no launch cost of
    their own: the whole fixed cost of the layer's kernels (None = not measured). Used only
    by profiles without a ``launch`` fit."""
    launch: LaunchFit | None = None
    """The MoE layer as a launch pipeline (None = not fitted: a fixed glue time per layer,
    ``layer_overhead_us``, added to kernels that each carry their launch cost)."""
    routing_ns_per_element: float = Field(default=0.0, ge=0)
    """Routing work per token x expert element (scoring, top-k), from routing measurements."""
    routing_ns_per_slot: float = Field(default=0.0, ge=0)
    """Routing work per token x top_k slot (sorting and indexing the choices)."""
    activation_ns_per_element: dict[str, float] = Field(default_factory=dict)
    """Measured time per element of each activation function (silu, gelu, relu) beyond its
    memory traffic: transcendental functions are compute-bound on CPUs."""
    gather_ns_per_element: float = Field(default=0.0, ge=0)
    """Dispatch gather (rows into the expert-sorted buffer), per element beyond memory time."""
    scatter_ns_per_element: float = Field(default=0.0, ge=0)
    """Combine scatter-add (weighted rows back to tokens), per element beyond memory time."""
    collectives: tuple[CollectiveFit, ...] = ()
    """Measured collectives, when several devices were present."""
    ep_host_overhead_us: float | None = Field(default=None, ge=0)
    """Host-side fixed cost of one eagerly launched expert-parallel MoE layer beyond its
    kernels and collectives: the blocking read of the all-to-all split sizes (as
    Megatron-Core's all-to-all dispatcher does) and the launches issued after it, which
    the GPU then waits for. Fitted on measured EP layers
    (:func:`moesim.calibrate.ep_fit.ep_host_overhead_us`); used with ``ep x etp > 1``,
    ``launch: eager`` and dropless routing (data-dependent split sizes) only (None = not
    measured: 0)."""
    ep_host_overhead_source: str | None = None
    """Where ``ep_host_overhead_us`` comes from."""
    gemm_fit: FitQuality | None = None
    """Fit quality of the GEMM model on the GEMM measurements."""
    layer_fit: FitQuality | None = None
    """Fit quality of the whole cost path on the calibration-set layers (eager)."""
    graph_layer_fit: FitQuality | None = None
    """The same for CUDA-graph replays."""
    training: StepKernelFit | None = None
    """Measured training-step kernels (attention backward, loss, norms, optimizer); None:
    counted from the implementation at the memory bandwidth and the GEMM rate."""
