"""The ``training`` workload: training steps of the whole model under a DP x TP x PP x EP
layout (Megatron-Core conventions), with a pipeline schedule, recomputation and ZeRO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.units import BYTES_PER_ELEMENT


class TrainingWorkload(Frozen):
    """Training steps: micro-batches through the pipeline, then gradient sync and the
    optimizer step. The global batch is ``dp x micro_batch_sequences x microbatches``
    sequences of ``seq_len`` tokens."""

    kind: Literal["training"]
    seq_len: int = Field(ge=1)
    """Tokens per sequence."""
    micro_batch_sequences: int = Field(default=1, ge=1)
    """Sequences per micro-batch on each data-parallel rank."""
    microbatches: int = Field(ge=1)
    """Micro-batches per step through the pipeline (gradient accumulation steps)."""
    steps: int = Field(default=1, ge=1)
    """Training steps simulated (each samples its own routing)."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Pipeline schedule: all forwards then all backwards (GPipe, Huang et al. 2019), or
    one-forward-one-backward (PipeDream-Flush / Megatron 1F1B, Narayanan et al. 2021)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Korthikanti et al. 2022): none; selective (attention
    scores recomputed); full (each layer's forward rerun in backward, only inputs kept)."""
    flash_attention: bool = True
    """Attention kernels that never store the score matrix (FlashAttention, Dao et al.
    2022): its activations are not kept, only each block's inputs and outputs."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO (Rajbhandari et al. 2020): 1 shards optimizer states, 2 also gradients, 3 also
    weights, over each parameter's data-parallel group."""
    overlap_a2a: bool = False
    """Overlap MoE all-to-all with expert computation by splitting each micro-batch in two
    (one half's communication hides behind the other half's compute)."""
    grad_all_reduce: Literal["ring", "halving_doubling", "tree"] = "ring"
    """Algorithm of the gradient all-reduce (see moesim.cost.collectives)."""
    duration_s: float | None = Field(default=None, gt=0)
    """Wall-clock length of a training *run* over many steps, seconds, with the failures,
    checkpoints and restarts of the ``failures`` section (null = one step only)."""
    optimizer_bytes_per_param: int | None = Field(default=None, ge=0)
    """Optimizer state per parameter (null: the precision recipe's Adam: ``bf16`` keeps an
    fp32 master copy, momentum and variance = 12 bytes, ZeRO paper Sec. 3.1;
    ``amp_fp32_master``'s weights are the fp32 master, so momentum and variance = 8)."""
    precision: Literal["bf16", "amp_fp32_master"] = "bf16"
    """Training precision recipe. ``bf16``: bf16 weights, gradients and activations (the
    optimizer keeps its own fp32 state, ``optimizer_bytes_per_param``). ``amp_fp32_master``:
    PyTorch autocast over fp32 weights: every forward casts the weights to bf16, the
    residual stream and norms stay fp32, gradients are fp32 (cast from the bf16 products'
    weight gradients) and are all-reduced in fp32."""
    grad_sync: Literal["flat", "bucketed"] = "flat"
    """Gradient synchronisation across data parallelism. ``flat``: one flat buffer
    all-reduced after the backward pass (nothing overlaps). ``bucketed``: PyTorch DDP /
    Megatron buckets of ``bucket_mb``, each all-reduced as soon as the backward has
    produced its gradients, overlapping the rest of the backward pass."""
    persistent_grads: bool = True
    """Gradients live in buffers that persist between steps (PyTorch DDP's buckets,
    Megatron's gradient buffers, FSDP's shards): they add to the activations at the
    memory peak. False: plain PyTorch, which frees them between steps
    (``zero_grad(set_to_none=True)``), so they appear only as the backward frees the
    activations and the peak is the larger of the two phases."""
    bucket_mb: float = Field(default=25.0, ge=0.1)
    """Bucket size of ``grad_sync: bucketed``, MB (PyTorch DDP's default
    ``bucket_cap_mb`` is 25)."""

    @property
    def weight_bytes(self) -> int:
        """Bytes per stored weight (bf16, or the fp32 master that autocast casts)."""
        return BYTES_PER_ELEMENT["fp32" if self.precision == "amp_fp32_master" else "bf16"]

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient element, also the width of the gradient all-reduce."""
        return self.weight_bytes

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream and its norms (fp32 under autocast)."""
        return self.weight_bytes

    @property
    def state_bytes(self) -> int:
        """Optimizer state per parameter (see ``optimizer_bytes_per_param``)."""
        if self.optimizer_bytes_per_param is not None:
            return self.optimizer_bytes_per_param
        return 8 if self.precision == "amp_fp32_master" else 12
