"""The one attention cost: one self-attention block's forward on one device, for a batch of
sequences each computing ``n`` new tokens after ``c`` cached ones.

Serving (:mod:`moesim.cost.iteration`, a mixed batch of prefill chunks and decodes) and
training (:mod:`moesim.cost.training`, a micro-batch of whole sequences: ``n = seq_len``,
``c = 0``) both price attention here, so the two workloads cannot drift apart.

- **Projections**: the QKV and output projections as ``Roofline.gemm_s`` over the batch's
  new tokens, heads split over ``tp`` (GQA/MQA: ``max(1, kv_heads / tp)`` KV heads per
  device); MLA: its low-rank q projection (or the full one without ``q_lora_rank``), the
  kv down-projection to ``kv_lora_rank + qk_rope_head_dim`` and the up-projection to
  every head's nope-key and value, then the output projection. Memoized by token count.
- **Scores**: one fused causal attention kernel over the whole batch (FlashAttention,
  Dao et al. 2022; FlashAttention-2, Dao 2023), as vLLM v1 runs prefill chunks and decodes
  together: FLOPs ``2 x heads x (qk_dim + v_dim)`` per (query, key) pair, and under the
  causal mask a chunk of ``n`` new tokens after ``c`` cached ones attends
  ``n c + n (n + 1) / 2`` keys (the kernel skips fully masked blocks); bytes: the KV of
  every key read once (``c + n`` tokens x KV bytes per token per layer,
  :func:`moesim.derived.serving_memory.kv_bytes_per_token_per_layer`) plus the queries
  and outputs (``n x heads x (qk_dim + v_dim)`` elements); timed by
  ``Roofline.product_s``, so decodes come out memory-bound and long prefills
  compute-bound. MLA is counted in its un-absorbed form (per-head qk width
  ``nope + rope``, v width ``v_head_dim``), the convention of
  :mod:`moesim.derived.model_figures`.

Not here: the tensor-parallel all-reduce after the output projection (the callers price
it over the topology), the backward pass (training's conventions: 2x projections, 2.5x
scores), norms, rotary embeddings and residual adds. Causal self-attention only: an
encoder-decoder's bidirectional encoder blocks are priced as causal, and its decoder's
cross-attention is not priced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from moesim.config.hardware import AcceleratorSpec
from moesim.config.model import ModelConfig
from moesim.config.profile import DeviceProfile
from moesim.cost.compute import Roofline
from moesim.derived.serving_memory import kv_bytes_per_token_per_layer
from moesim.units import BYTES_PER_ELEMENT


@dataclass(frozen=True)
class KernelRate:
    """A measured rate of the fused causal kernel (a profile's ``training:`` section): at
    long sequences ``flops_per_s``; a query that attends few keys leaves the kernel's
    per-block fixed work uncovered, so the rate is ``flops_per_s x q / (q + keys_knee)``
    for ``q`` keys per query on average (fitted on whole causal sequences of ``n``, where
    ``q = (n + 1) / 2`` and ``keys_knee`` is half the fitted sequence knee)."""

    flops_per_s: float
    keys_knee: float


def measured_rate(profile: DeviceProfile | None) -> KernelRate | None:
    """The fused kernel's rate measured in a device profile (its ``training:`` section),
    else None."""
    fit = profile.training if profile is not None else None
    if fit is None:
        return None
    return KernelRate(fit.attention_tflops * 1e12, fit.attention_seq_knee / 2)


@dataclass(frozen=True)
class AttentionTime:
    """One attention block's forward on one device, seconds."""

    projections_s: float
    """QKV (MLA: low-rank q and kv) and output projections."""
    scores_s: float
    """The fused causal attention kernel (QK^T, softmax, AV)."""

    @property
    def total_s(self) -> float:
        return self.projections_s + self.scores_s


def causal_keys(new_tokens: int, cached_tokens: int) -> int:
    """(query, key) pairs of ``new_tokens`` queries after ``cached_tokens`` under a causal
    mask: ``n c + n (n + 1) / 2``."""
    n, c = new_tokens, cached_tokens
    return n * c + n * (n + 1) // 2


def head_dims(model: ModelConfig) -> tuple[int, int]:
    """Per-head query/key and value widths (MLA un-absorbed: ``nope + rope``, ``v_head_dim``)."""
    m = model
    if m.attention == "mla":
        assert m.qk_nope_head_dim and m.qk_rope_head_dim and m.v_head_dim
        return m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    d = m.head_dim_resolved
    return d, d


AttentionKernel = Literal["fused", "packed"]
"""How an engine runs attention over a batch (see :meth:`AttentionCost.scores_s`)."""


class AttentionCost:
    """Attention of one block on one device of a ``tp``-way tensor-parallel group.

    Cheap enough for a serving iteration: projections are memoized by token count and the
    scores are one roofline evaluation over per-rank totals (vectorized over ranks).
    """

    def __init__(
        self,
        rf: Roofline,
        model: ModelConfig,
        tp: int,
        kernel: AttentionKernel = "fused",
        rate: KernelRate | None = None,
        accelerator: AcceleratorSpec | None = None,
    ) -> None:
        """``accelerator``: its datasheet peaks price a core in ``model.attention_dtype``
        other than the model's ``dtype`` (serving passes it; without it, as in training's
        mixed-precision convention, the core runs at ``rf``'s rate and width)."""
        self.rf = rf
        self.kernel = kernel
        self.rate = rate
        """The fused kernel's measured rate (None: the device's GEMM rate)."""
        self.model = model
        self.tp = tp
        self.heads = model.heads // tp
        self.qk_dim, self.v_dim = head_dims(model)
        self.width = self.heads * (self.qk_dim + self.v_dim)
        """Query plus output elements of one token, and score FLOPs / 2 per (query, key)."""
        self.kv_bytes = kv_bytes_per_token_per_layer(model, tp)
        """KV bytes of one token in one block on this device."""
        core = model.attention_dtype if accelerator is not None else None
        self.core_bytes_per_element = BYTES_PER_ELEMENT[core] if core else rf.bytes_per_element
        """Bytes of one query or output element of the core (``attention_dtype``)."""
        self.core_scale = (
            accelerator.peak_tflops.for_dtype(model.dtype) / accelerator.peak_tflops.for_dtype(core)
            if accelerator is not None and core is not None and core != model.dtype
            else 1.0
        )
        """The core's FLOPs as GEMM-rate-equivalent FLOPs of ``rf`` (the datasheet peak
        ratio of the model's dtype to the core's: 2 for a bf16 core of an fp8 model on
        Hopper); 1 when the core runs in the model's dtype."""
        self.core_flops_per_s = rf.flops_per_s / self.core_scale
        """The core's FLOP rate."""
        self._proj: dict[int, float] = {}
        self.absorbed_width = 0
        """Query plus output elements of one token in the absorbed MLA form (0: never
        absorbed; see ``ModelConfig.mla_absorbed_decode``)."""
        if model.attention == "mla" and model.mla_absorbed_decode and kernel == "fused":
            assert model.kv_lora_rank and model.qk_rope_head_dim
            self.absorbed_width = self.heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)

    def width_for(self, tokens: float, sampled: float | None) -> int:
        """The core's per-token width for a batch of ``tokens`` computed tokens with
        logits at ``sampled`` of them: absorbed when the model says so and every computed
        token is a decode or verified draft (``sampled == tokens``)."""
        if self.absorbed_width and sampled is not None and tokens > 0 and sampled == tokens:
            return self.absorbed_width
        return self.width

    def projections_s(self, tokens: int) -> float:
        """QKV (or MLA q/kv) and output projections over ``tokens`` new tokens."""
        if tokens <= 0:
            return 0.0
        t = self._proj.get(tokens)
        if t is None:
            m, rf, h = self.model, self.rf, self.heads
            if m.attention == "mla":
                assert m.kv_lora_rank and m.qk_rope_head_dim and m.qk_nope_head_dim
                q = (
                    rf.gemm_s(tokens, m.d_model, m.q_lora_rank)
                    + rf.gemm_s(tokens, m.q_lora_rank, h * self.qk_dim)
                    if m.q_lora_rank
                    else rf.gemm_s(tokens, m.d_model, h * self.qk_dim)
                )
                kv = rf.gemm_s(tokens, m.d_model, m.kv_lora_rank + m.qk_rope_head_dim)
                kv += rf.gemm_s(tokens, m.kv_lora_rank, h * (m.qk_nope_head_dim + self.v_dim))
                qkv = q + kv
            else:
                kv_heads = max(1, m.kv_heads_resolved // self.tp)
                qkv = rf.gemm_s(tokens, m.d_model, (h + 2 * kv_heads) * self.qk_dim)
            t = float(qkv + rf.gemm_s(tokens, h * self.v_dim, m.d_model))
            self._proj[tokens] = t
        return t

    def scores_s(
        self,
        tokens: ArrayLike,
        keys: ArrayLike,
        kv_read_tokens: ArrayLike,
        sampled: ArrayLike | None = None,
    ) -> np.ndarray:
        """The attention kernel over batches of ``tokens`` new tokens attending ``keys``
        (query, key) pairs and reading the KV of ``kv_read_tokens`` tokens (arrays: one
        batch each; an empty batch still counts one kernel launch, callers mask it).

        ``fused``: one causal kernel that skips masked blocks (FlashAttention). ``packed``:
        the batch packed as one sequence with a block-diagonal causal mask, as transformers'
        paged SDPA runs it (``integrations/sdpa_paged.py``, 5.17): the KV of every
        scheduled request gathered from the cache (``index_select``: read and write),
        repeated to every query head (a copy), then one dense masked attention over
        ``tokens x kv_read_tokens`` scores (nothing skipped) reading the bf16 mask."""
        w = self.width
        if self.kernel == "packed":
            q = np.asarray(tokens, dtype=float)
            kv = np.asarray(kv_read_tokens, dtype=float)
            b = self.rf.bytes_per_element
            expanded = kv * self.heads * (self.qk_dim + self.v_dim) * b  # K and V, all heads
            moved = (
                2 * kv * self.kv_bytes  # gather: read the cache, write the packed copy
                + kv * self.kv_bytes  # repeat_kv reads the packed copy ...
                + 2 * expanded  # ... writes it for every head; the kernel reads it
                + q * kv * b  # the mask
                + q * w * b  # queries and outputs
            )
            return self.rf.product_s(2.0 * w * q * kv, moved)
        k = np.asarray(keys, dtype=float)
        width: int | np.ndarray = w
        if self.absorbed_width and sampled is not None:  # decode ranks in the latent space
            n = np.asarray(tokens, dtype=float)
            decode = (n > 0) & (np.asarray(sampled, dtype=float) == n)
            width = np.where(decode, self.absorbed_width, w)
        flops = 2.0 * width * k
        if self.rate is not None:  # the measured kernel rate, as GEMM-rate-equivalent FLOPs
            per_query = k / np.maximum(np.asarray(tokens, dtype=float), 1.0)
            flops = flops * self._rate_scale(per_query)
        elif self.core_scale != 1.0:  # a core in another precision than the weights
            flops = flops * self.core_scale
        return self.rf.product_s(
            flops,
            np.asarray(kv_read_tokens, dtype=float) * self.kv_bytes
            + np.asarray(tokens, dtype=float) * width * self.core_bytes_per_element,
        )

    def _rate_scale(self, per_query: np.ndarray | float) -> np.ndarray | float:
        """Factor turning the kernel's FLOPs into GEMM-rate-equivalent FLOPs."""
        assert self.rate is not None
        r = self.rate
        safe = np.maximum(per_query, 1e-9)
        return (self.rf.flops_per_s / r.flops_per_s) * (safe + r.keys_knee) / safe

    def score_s(
        self, tokens: int, keys: float, kv_read_tokens: int, sampled: int | None = None
    ) -> float:
        """:meth:`scores_s` of one batch as a float (plain arithmetic, the same operations
        in the same order; serving calls it once per DP rank per iteration)."""
        w = self.width
        rf = self.rf
        if self.kernel == "packed":
            q, kv = float(tokens), float(kv_read_tokens)
            b = rf.bytes_per_element
            expanded = kv * self.heads * (self.qk_dim + self.v_dim) * b
            moved = (
                2 * kv * self.kv_bytes + kv * self.kv_bytes + 2 * expanded + q * kv * b + q * w * b
            )
            return rf.product_scalar_s(2.0 * w * q * kv, moved)
        if self.absorbed_width:
            w = self.width_for(tokens, sampled)
        flops = 2.0 * w * float(keys)
        if self.rate is not None:
            flops *= float(self._rate_scale(float(keys) / max(float(tokens), 1.0)))
        elif self.core_scale != 1.0:
            flops *= self.core_scale
        return rf.product_scalar_s(
            flops,
            float(kv_read_tokens) * self.kv_bytes + float(tokens) * w * self.core_bytes_per_element,
        )

    def forward(self, sequences: Iterable[tuple[int, int]]) -> AttentionTime:
        """One block's forward over ``sequences`` of ``(new_tokens, cached_tokens)``."""
        tokens = keys = kv_read = 0
        for n, c in sequences:
            tokens += n
            keys += causal_keys(n, c)
            kv_read += c + n
        if tokens <= 0:
            return AttentionTime(0.0, 0.0)
        return AttentionTime(
            self.projections_s(tokens), float(self.scores_s(tokens, keys, kv_read))
        )


def attention_forward_s(
    rf: Roofline, model: ModelConfig, tp: int, sequences: Iterable[tuple[int, int]]
) -> AttentionTime:
    """One attention block's forward on one device over ``sequences`` of
    ``(new_tokens, cached_tokens)`` (see the module docstring)."""
    return AttentionCost(rf, model, tp).forward(sequences)
