"""Measured kernels of a training step beyond the MoE layer: fused causal attention (forward
and backward), the cross-entropy loss over the vocabulary, RMSNorm, and the fused AdamW
update. Part of a device profile (``training:``), fitted by ``moesim calibrate
--training`` on primitive measurements (``python3 -m moesim.calibrate.torch_train
--sections primitives``) and checked on whole training steps measured separately.

Times: ``overhead + work / rate`` per kernel. Attention's rate falls for short sequences
(a causal kernel's query blocks see ``n / 2`` keys on average, so per-block fixed work
weighs more): ``rate(n) = attention_tflops x n / (n + attention_seq_knee)``.
"""

from __future__ import annotations

from pydantic import Field

from moesim.config.base import Frozen


class StepKernelFit(Frozen):
    """A device's measured training-step kernels (bf16 activations unless stated)."""

    attention_tflops: float = Field(gt=0)
    """Forward FLOP rate of the fused causal attention kernel at long sequences, TFLOP/s
    (FLOPs: ``4 x heads x head_dim x n^2 / 2`` per sequence of ``n``)."""
    attention_seq_knee: float = Field(ge=0)
    """Sequence length at which the forward rate is half ``attention_tflops``."""
    attention_overhead_us: float = Field(ge=0)
    """Fixed time of one forward attention kernel."""
    attention_bwd_tflops: float = Field(gt=0)
    """The backward's rate on the forward's FLOPs (its kernels do ~2.5x the work)."""
    attention_bwd_seq_knee: float = Field(ge=0)
    attention_bwd_overhead_us: float = Field(ge=0)
    cross_entropy_fwd_bytes_per_logit: float = Field(gt=0)
    """Memory traffic of the loss's forward per logit (bf16 logits cast to fp32,
    log-softmax, the target's pick), at the profile's memory bandwidth."""
    cross_entropy_bwd_bytes_per_logit: float = Field(gt=0)
    """The same for the backward (softmax minus one-hot, cast back to bf16)."""
    norm_fwd_passes: float = Field(gt=0)
    """RMSNorm forward traffic in passes over its input (one pass = read + write)."""
    norm_fwd_overhead_us: float = Field(ge=0)
    norm_bwd_passes: float = Field(gt=0)
    """RMSNorm backward traffic in passes over its input (input and weight gradients)."""
    norm_bwd_overhead_us: float = Field(ge=0)
    optimizer_ps_per_param: float = Field(ge=0)
    """Fused AdamW: fixed time per parameter (its arithmetic) ..."""
    optimizer_bytes_per_s: float = Field(gt=0)
    """... plus the bytes it moves per parameter (weight, gradient, states: read; weight and
    states: written) at this rate."""
    cast_narrow_bytes_per_s: float | None = Field(default=None, gt=0)
    """fp32 -> bf16 casts (autocast's weight casts), bytes read + written per second
    (None: the memory bandwidth)."""
    cast_widen_bytes_per_s: float | None = Field(default=None, gt=0)
    """bf16 -> fp32 casts (weight gradients into the fp32 master's gradient), bytes read +
    written per second: measured at about half the narrowing rate on an H200."""
    source: str = Field(min_length=1)
    fit_median_abs_error: float | None = Field(default=None, ge=0)
    """Median |relative error| of these models on the primitives they were fitted on."""
