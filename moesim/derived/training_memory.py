"""Device memory of training: weights, gradients, optimizer states, activations and
communication buffers per device, and whether they fit.

Pure functions, no I/O. Parameters per device follow the serving layout
(:func:`moesim.derived.serving_memory.serving_memory`: experts split over ep x etp, the rest
over tp, blocks over pp). Mixed-precision training (``precision: bf16``) keeps bf16
weights and gradients (2 + 2 bytes per parameter) and ``optimizer_bytes_per_param`` of
fp32 state (Adam: 12); autocast over fp32 master weights (``amp_fp32_master``) keeps
fp32 weights and gradients (4 + 4) and Adam's moments (8);
ZeRO stage 1 shards the optimizer state, 2 also the gradients, 3 also the weights, over
the parameter's data-parallel group: dp for dense parameters, the expert-data-parallel
group (dp x tp / (ep x etp)) for experts (Rajbhandari et al., "ZeRO", SC 2020).

Activations per transformer block and micro-batch (Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models", MLSys 2023, Sec. 4, bf16):
attention ``s b h (11 + 5 a s / h)`` bytes, layer norms ``4 s b h``, all divided by tp
with sequence parallelism; selective recomputation and FlashAttention (which never stores
the score matrix) drop the ``5 a s / h`` term; full
recomputation keeps only each block's input, ``2 s b h``. The FFN's ``19 s b h`` is
replaced, for an MoE block, by what its expert slots keep per token: the routed input and
probabilities, and per slot the expert input (2h), the up/gate outputs (2 x 2 d_ff if
gated, else 2 d_ff), the activated gate (2 d_ff, gated only), the activation output
(2 d_ff) and the expert's output kept by the weighted combine (2h), plus the shared
experts likewise (without the combine's copy);
dense blocks keep the dense FFN's equivalent. A pipeline stage holds the activations of
the micro-batches in flight: all of them under GPipe, ``pp - stage`` under 1F1B.

With ZeRO-Offload (``policies.offload.optimizer``; Ren et al., USENIX ATC 2021) the
optimizer states move to the host: ``optimizer`` is 0 on the device and
``offloaded_optimizer`` holds the bytes the host keeps for the device. With expert
offloading as well (``policies.offload.experts``), the device holds the weights and
gradients of its cached and staged experts only; the others stream in from the host
(:func:`moesim.cost.offload.offload_stages`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moesim.config.hardware import AcceleratorSpec
from moesim.config.model import ModelConfig
from moesim.config.offload import ExpertOffloadConfig
from moesim.config.parallelism import ParallelismConfig
from moesim.config.training import TrainingWorkload
from moesim.derived.serving_memory import serving_memory
from moesim.units import BF16_BYTES, BYTES_PER_ELEMENT, GIB

LOSS_BYTES_PER_LOGIT = BF16_BYTES + 2 * BYTES_PER_ELEMENT["fp32"]
"""The loss's logits at its peak: the bf16 head output, its fp32 copy and the fp32
log-probabilities the backward keeps."""


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes on the busiest device (pipeline stage 0) by component."""

    device_bytes: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    comm_buffers: int
    offloaded_optimizer: int = 0
    """Optimizer state of this device kept in host DRAM (ZeRO-Offload), not in ``total``."""
    persistent_grads: bool = True
    """Gradients persist between steps (see ``TrainingWorkload.persistent_grads``); also
    set when gradients of earlier micro-batches stay alive while later ones run forward
    (gradient accumulation, several pipeline stages), whatever the buffers."""
    block_activations: int = 0
    """Activations of one block (the backward's working set when gradients are freed)."""

    @property
    def total(self) -> int:
        """The peak: with persistent gradients, everything at once; else the end of the
        forward (all activations) or the end of the backward (all gradients, with one
        block's activations still in use), whichever is larger."""
        if self.persistent_grads:
            live = self.gradients + self.activations
        else:
            live = max(self.activations, self.gradients + self.block_activations)
        return self.weights + self.optimizer + live + self.comm_buffers

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def as_gib(self) -> dict[str, float]:
        parts = {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "comm_buffers": self.comm_buffers,
            "total": self.total,
            "capacity": self.device_bytes,
        }
        return {k: round(v / GIB, 3) for k, v in parts.items()}


def _ffn_act_per_slot(d_model: int, d_ff: int, gated: bool) -> int:
    """Bytes an FFN keeps per token (slot) in bf16: its input, the up (and gate) output, the
    activated gate (a gated unit's product keeps both factors), the activation output."""
    return 2 * d_model + 2 * d_ff * (2 if gated else 1) + 2 * d_ff * (2 if gated else 1)


def block_activation_bytes(
    m: ModelConfig, moe: bool, w: TrainingWorkload, p: ParallelismConfig
) -> float:
    """Activations one block keeps for backward, per micro-batch, on one device."""
    s, b, h = w.seq_len, w.micro_batch_sequences, m.d_model
    if w.recompute == "full":
        return 2 * s * b * h / p.tp
    heads = m.heads
    keeps_scores = w.recompute == "none" and not w.flash_attention
    attention = s * b * h * (11 + (5 * heads * s / h if keeps_scores else 0))
    norms = 4 * s * b * h
    if moe:
        # per routed slot also the expert's output, which the weighted combine keeps
        per_token = (
            2 * h
            + 4 * m.experts
            + m.top_k * (_ffn_act_per_slot(h, m.expert_d_ff // p.etp, m.is_gated) + 2 * h)
        )
        if m.shared_experts:
            per_token += _ffn_act_per_slot(h, m.shared_d_ff * m.shared_experts, m.is_gated)
        ffn = per_token * s * b
    else:
        ffn = _ffn_act_per_slot(h, m.dense_d_ff or m.expert_d_ff, m.dense_is_gated) * s * b
    return (attention + norms + ffn) / p.tp


def training_memory(
    m: ModelConfig,
    p: ParallelismConfig,
    acc: AcceleratorSpec,
    w: TrainingWorkload,
    offload_optimizer: bool = False,
    offload_experts: ExpertOffloadConfig | None = None,
) -> TrainingMemory:
    """Memory of pipeline stage 0's devices (they hold the most micro-batches); with
    ``offload_optimizer`` the optimizer states live on the host; with ``offload_experts``
    the device keeps the weights and gradients of its cached and staged experts only."""
    sm = serving_memory(m, p, acc)
    resident = serving_memory(m, p, acc, offload_experts)
    expert_params = sm.expert_weight_bytes // m.bytes_per_param
    resident_params = resident.expert_weight_bytes // m.bytes_per_param
    other_params = sm.other_weight_bytes // m.bytes_per_param
    edp = max(1, p.dp * p.tp // (p.ep * p.etp))

    def shard(params: int, group: int, stage: int) -> float:
        return params / group if w.zero_stage >= stage else float(params)

    weights = w.weight_bytes * (shard(other_params, p.dp, 3) + shard(resident_params, edp, 3))
    grads = w.grad_bytes * (shard(other_params, p.dp, 2) + shard(resident_params, edp, 2))
    optim = w.state_bytes * (shard(other_params, p.dp, 1) + shard(expert_params, edp, 1))
    blocks = math.ceil(m.layers / p.pp)
    moe_share = len(m.moe_layer_indices) / m.layers
    per_block = moe_share * block_activation_bytes(m, True, w, p) + (1 - moe_share) * (
        block_activation_bytes(m, False, w, p)
    )
    in_flight = w.microbatches if w.schedule == "gpipe" else min(p.pp, w.microbatches)
    if w.weight_bytes != BF16_BYTES:
        # autocast's bf16 copies of the weights a block multiplies stay alive until its
        # backward (the products saved them), once per micro-batch in flight; the whole
        # block's weights (under ZeRO-3 the gathered ones, not this device's shard)
        block_params = (other_params + resident_params) / max(1, blocks)
        per_block += BF16_BYTES * block_params
    activations = blocks * per_block * in_flight
    if p.pp == 1:  # the loss on this (last) stage: logits in bf16, their fp32 copy and
        # the fp32 log-probabilities saved for backward, all alive at the loss's forward
        activations += (
            LOSS_BYTES_PER_LOGIT * w.seq_len * w.micro_batch_sequences * (m.vocab_size / p.tp)
        )
    tokens_local = w.seq_len * w.micro_batch_sequences / p.tp
    comm = 2 * BF16_BYTES * tokens_local * m.top_k * m.d_model  # a2a send + receive buffers
    return TrainingMemory(
        device_bytes=sm.device_bytes,
        weights=int(weights),
        gradients=int(grads),
        optimizer=0 if offload_optimizer else int(optim),
        activations=int(activations),
        comm_buffers=int(comm),
        offloaded_optimizer=int(optim) if offload_optimizer else 0,
        # one micro-batch on one stage: gradients appear only as its backward frees the
        # activations; with accumulation or a pipeline they coexist with later forwards
        persistent_grads=w.persistent_grads or w.microbatches > 1 or p.pp > 1,
        block_activations=int(per_block),
    )
