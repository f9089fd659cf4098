"""The kernels a training step runs around its MoE layers, priced on one device: causal
attention's backward (its forward is ``moesim.cost.attention``'s), RMSNorm, elementwise
glue (rotary embeddings, residual adds, casts), the cross-entropy loss over the
vocabulary, and the fused AdamW update.

With a measured profile (``training:`` section, :class:`moesim.config.step_kernels.
StepKernelFit`) the constants are fitted on primitive measurements; without one they are
counted from the implementation: attention at the device's GEMM rate with a 2.5x backward
(FlashAttention-2, Dao 2023), one pass over the input for a norm's forward and two for its
backward, the loss's memory traffic counted per logit (:data:`CE_FWD_BYTES_PER_LOGIT`),
AdamW's bytes at the memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.profile import DeviceProfile
from moesim.cost.compute import Roofline

CE_FWD_BYTES_PER_LOGIT = 22.0
"""Counted loss forward per logit: read bf16 (2), write fp32 (4), log-softmax reads it for
the maximum and the sum of exponentials and writes its output (4 x 3), the pick (4)."""
CE_BWD_BYTES_PER_LOGIT = 22.0
"""Counted loss backward per logit: softmax from the saved log-probabilities (read 4,
write 4), minus the one-hot (read 4, write 4), cast to bf16 (read 4, write 2)."""
ROPE_PASSES = 5.0
"""Rotary embeddings on the queries, and again on the keys, as transformers'
``apply_rotary_pos_emb`` runs them: ``x cos + rotate_half(x) sin`` in five unfused
elementwise kernels (negate half, concatenate, two products, a sum), each about one pass
(read + write) over the tensor."""


@dataclass(frozen=True)
class StepKernels:
    """Training-step kernel costs of one device, in seconds (SI inside)."""

    attention_bwd_flops_per_s: float
    attention_bwd_seq_knee: float
    attention_bwd_overhead_s: float
    ce_fwd_bytes_per_logit: float
    ce_bwd_bytes_per_logit: float
    norm_fwd_passes: float
    norm_fwd_overhead_s: float
    norm_bwd_passes: float
    norm_bwd_overhead_s: float
    optimizer_s_per_param: float
    optimizer_bytes_per_s: float
    memory_bytes_per_s: float
    kernel_overhead_s: float
    source: str
    cast_narrow_bytes_per_s: float = 0.0
    """fp32 -> bf16 cast rate (0: the memory bandwidth)."""
    cast_widen_bytes_per_s: float = 0.0
    """bf16 -> fp32 cast rate (0: the memory bandwidth)."""

    @classmethod
    def of(cls, rf: Roofline, profile: DeviceProfile | None) -> StepKernels:
        """Measured kernels from ``profile.training``, else counted ones (see module)."""
        fit = profile.training if profile is not None else None
        bw, o = rf.memory_bytes_per_s, rf.overhead_s
        if fit is None:
            return cls(
                attention_bwd_flops_per_s=rf.flops_per_s / 2.5,
                attention_bwd_seq_knee=0.0,
                attention_bwd_overhead_s=2 * o,
                ce_fwd_bytes_per_logit=CE_FWD_BYTES_PER_LOGIT,
                ce_bwd_bytes_per_logit=CE_BWD_BYTES_PER_LOGIT,
                norm_fwd_passes=1.0,
                norm_fwd_overhead_s=o,
                norm_bwd_passes=2.0,
                norm_bwd_overhead_s=2 * o,
                optimizer_s_per_param=0.0,
                optimizer_bytes_per_s=bw,
                memory_bytes_per_s=bw,
                kernel_overhead_s=o,
                source="counted from the implementation (no measured training kernels)",
            )
        return cls(
            attention_bwd_flops_per_s=fit.attention_bwd_tflops * 1e12,
            attention_bwd_seq_knee=fit.attention_bwd_seq_knee,
            attention_bwd_overhead_s=fit.attention_bwd_overhead_us * 1e-6,
            ce_fwd_bytes_per_logit=fit.cross_entropy_fwd_bytes_per_logit,
            ce_bwd_bytes_per_logit=fit.cross_entropy_bwd_bytes_per_logit,
            norm_fwd_passes=fit.norm_fwd_passes,
            norm_fwd_overhead_s=fit.norm_fwd_overhead_us * 1e-6,
            norm_bwd_passes=fit.norm_bwd_passes,
            norm_bwd_overhead_s=fit.norm_bwd_overhead_us * 1e-6,
            optimizer_s_per_param=fit.optimizer_ps_per_param * 1e-12,
            optimizer_bytes_per_s=fit.optimizer_bytes_per_s,
            memory_bytes_per_s=bw,
            kernel_overhead_s=o,
            source=f"measured: {fit.source}",
            cast_narrow_bytes_per_s=fit.cast_narrow_bytes_per_s or 0.0,
            cast_widen_bytes_per_s=fit.cast_widen_bytes_per_s or 0.0,
        )

    def attention_bwd_s(self, flops: float, seq: int) -> float:
        """Backward of one causal attention kernel whose forward does ``flops`` FLOPs over
        sequences of ``seq`` tokens (the forward is :class:`moesim.cost.attention.
        AttentionCost`'s, at the same profile's measured rate)."""
        if flops <= 0:
            return 0.0
        return self.attention_bwd_overhead_s + flops * (seq + self.attention_bwd_seq_knee) / (
            self.attention_bwd_flops_per_s * seq
        )

    def norm_s(self, elements: float, elem_bytes: int) -> tuple[float, float]:
        """(forward, backward) of an RMSNorm over ``elements`` of ``elem_bytes`` each."""
        if elements <= 0:
            return 0.0, 0.0
        one_pass = 2.0 * elements * elem_bytes / self.memory_bytes_per_s
        return (
            self.norm_fwd_overhead_s + self.norm_fwd_passes * one_pass,
            self.norm_bwd_overhead_s + self.norm_bwd_passes * one_pass,
        )

    def elementwise_s(self, passes: float, elements: float, elem_bytes: int) -> float:
        """``passes`` unfused elementwise kernels, each reading and writing ``elements``."""
        if elements <= 0 or passes <= 0:
            return 0.0
        return passes * (
            self.kernel_overhead_s + 2.0 * elements * elem_bytes / self.memory_bytes_per_s
        )

    def cast_s(self, elements: float, src_bytes: int, dst_bytes: int) -> float:
        """A dtype cast of ``elements`` (read one width, write the other), at the measured
        rate of its direction (narrowing or widening) where the profile has one."""
        if elements <= 0:
            return 0.0
        rate = (
            self.cast_widen_bytes_per_s if dst_bytes > src_bytes else self.cast_narrow_bytes_per_s
        )
        return self.kernel_overhead_s + elements * (src_bytes + dst_bytes) / (
            rate or self.memory_bytes_per_s
        )

    def cross_entropy_s(self, tokens: int, vocab: int) -> tuple[float, float]:
        """(forward, backward) of the loss over ``tokens x vocab`` logits."""
        logits = float(tokens) * vocab
        if logits <= 0:
            return 0.0, 0.0
        bw = self.memory_bytes_per_s
        return self.ce_fwd_bytes_per_logit * logits / bw, self.ce_bwd_bytes_per_logit * logits / bw

    def optimizer_s(self, params: float, bytes_per_param: float) -> float:
        """One fused AdamW step over ``params`` parameters moving ``bytes_per_param``."""
        if params <= 0:
            return 0.0
        return params * (self.optimizer_s_per_param + bytes_per_param / self.optimizer_bytes_per_s)
