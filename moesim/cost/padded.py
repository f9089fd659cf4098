"""Capacity-padded experts, as Mesh-TF, GShard and the Switch Transformer run them.

Each rank cuts its tokens into routing groups (Mesh-TF's ``moe_group_size``, 1024 by
default; the Switch pseudocode's group is a core's tokens). Per group of ``s`` tokens the
router builds a one-hot *dispatch* mask and a *combine* mask (gate-weighted), both
``[s, E, C]`` with the expert capacity ``C = ceil(capacity_factor x s x top_k / E)``
(never more than ``s``): a token's position in its expert's buffer comes from a cumulative
sum over the tokens of the one-hot expert choice, and positions ``>= C`` are dropped. The
dispatch is an einsum over the mask, ``[s, d] x [s, E, C] -> [E, C, d]`` (a product of
``2 s E C d`` FLOPs on the matrix units), every ``[E, C, d]`` buffer is exchanged whole
(all-to-all bytes of ``E x C`` rows, kept or not), each expert runs its FFN over all of
its ``C`` rows of every group (a batched matrix product of equal slices), and the combine
is the same einsum backwards, ``[E, C, d] x [s, E, C] -> [s, d]``.

So, unlike grouped GEMMs over the kept tokens, time grows with the capacity factor even
when nothing is dropped, and the masks and einsums grow with ``s x E x C`` (the group
size times the capacity factor per token): Switch Transformer, Fedus et al. 2021
(arXiv:2101.03961) Sec. 2.2, Fig. 3 and Appendix F (Figs. 15-16); Mesh-TF
``transformer_moe_layer_v1`` (mesh_tensorflow/transformer/moe.py); GShard, Lepikhin et
al. 2020 (arXiv:2006.16668) Sec. 2.2 (``dispatch_mask``, ``combine_weights``, groups).

Costs, all on the device's :class:`moesim.cost.compute.Roofline`:

- building the masks (``policies.mask_build``): ``fused`` (XLA on TPUs) writes each
  ``[s, E, C]`` mask once at the activation width; ``eager`` (PyTorch op by op) makes,
  per routing choice, the slot one-hot (a boolean compare), keeps it where the position
  fits (a boolean and), casts it, adds it into the dispatch mask, scales it by the gate
  and adds that into the combine mask, after zero-filling both masks: ``22 k + 4`` bytes
  per mask element with 2-byte activations (the passes of
  :mod:`moesim.calibrate.torch_train`'s padded form, as in GShard-style PyTorch code);
  the ``[s, E]`` one-hot and cumulative sum are ``C`` times smaller and not counted;
- each einsum: one matrix-product kernel of ``2 g s E C d`` FLOPs reading its mask, its
  activations and writing its output; ``eager`` einsums also copy the ``[E, g C, d]``
  buffer and the mask into their product's layout (one read and one write each);
- experts: the device's expert kernel (grouped products) over every padded row: a batched
  product over equal slices runs at the grouped kernel's rates (measured on an H200: the
  padded and grouped Mixtral layers with the same rows, 2026-12-03, within 4%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.config.model import ModelConfig
from moesim.config.policies import PoliciesConfig
from moesim.cost.compute import Roofline
from moesim.routing.assignment import capacity_for


@dataclass(frozen=True)
class Groups:
    """How one rank's tokens are cut into routing groups and padded."""

    groups: int
    """Routing groups of the rank."""
    group_tokens: int
    """Tokens per group (the rank's tokens split evenly; the last group padded)."""
    capacity: int
    """Rows per expert per group (the expert capacity C)."""

    @property
    def rows_per_expert(self) -> int:
        """Rows each expert computes for this rank: ``groups x capacity``."""
        return self.groups * self.capacity

    def mask_elements(self, experts: int) -> int:
        """Elements of one ``[s, E, C]`` mask over all of the rank's groups."""
        return self.groups * self.group_tokens * experts * self.capacity


@dataclass(frozen=True)
class PaddedExperts:
    """The padded expert layout of a model under a capacity factor and group size."""

    capacity_factor: float
    group_size: int | None
    """Tokens per routing group (None: one group per rank)."""
    experts: int
    top_k: int
    mask_build: str = "fused"
    """``fused`` or ``eager`` (see the module docstring)."""

    @classmethod
    def of(cls, policies: PoliciesConfig, model: ModelConfig) -> PaddedExperts | None:
        """The padded layout of ``policies`` (None for grouped expert compute)."""
        if policies.expert_compute != "padded":
            return None
        if policies.capacity_factor is None:  # the config rejects it; kept for type narrowing
            raise ValueError("padded expert compute needs a capacity_factor")
        return cls(
            policies.capacity_factor,
            policies.group_size,
            model.experts,
            model.top_k,
            policies.mask_build,
        )

    def groups(self, tokens: int) -> Groups:
        """The groups of a rank holding ``tokens`` tokens."""
        if tokens <= 0:
            return Groups(0, 0, 0)
        size = tokens if self.group_size is None else min(self.group_size, tokens)
        n = math.ceil(tokens / size)
        s = math.ceil(tokens / n)
        cap = capacity_for(s, self.top_k, self.experts, self.capacity_factor)
        assert cap is not None  # a capacity factor is set
        return Groups(n, s, min(cap, s))

    def rows(self, tokens_per_rank: np.ndarray) -> np.ndarray:
        """Padded rows each rank sends each expert, ``(ranks x experts)``, int64: every
        expert gets ``groups x capacity`` rows of every rank, kept tokens or padding."""
        per_rank = [self.groups(int(n)).rows_per_expert for n in tokens_per_rank]
        return np.repeat(np.asarray(per_rank, dtype=np.int64)[:, None], self.experts, axis=1)

    def masks_s(self, rf: Roofline, tokens: int) -> float:
        """Building a rank's dispatch and combine masks over all its groups: ``fused``, each
        mask written once (one kernel per mask); ``eager``, the op-by-op passes (2 fills,
        then 6 kernels per routing choice) of ``22 k + 4`` bytes per element at 2-byte
        activations (1-byte booleans)."""
        g = self.groups(tokens)
        if not g.groups:
            return 0.0
        elements = g.mask_elements(self.experts)
        b = rf.bytes_per_element
        if self.mask_build == "fused":
            return 2 * float(rf.memory_s(elements * b))
        # per choice: compare (write 1), and (read 1, write 1), cast (read 1, write b),
        # dispatch += (read 2b, write b), x gate (read b, write b), combine += (read 2b,
        # write b); before them both masks are zero-filled (write b each)
        per_choice = 1 + 2 + (1 + b) + 3 * b + 2 * b + 3 * b
        nbytes = elements * (self.top_k * per_choice + 2 * b)
        kernels = 2 + 6 * self.top_k
        return float(rf.memory_s(nbytes)) + (kernels - 1) * rf.overhead_s

    def einsum_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """One dispatch or combine einsum of a rank over its masks: ``2 g s E C d`` FLOPs
        on the matrix units, reading the mask and the ``[s, d]`` side, writing (or
        reading) the ``[E, C, d]`` buffers; ``eager`` einsums first copy their operands
        into the product's layout."""
        g = self.groups(tokens)
        if not g.groups:
            return 0.0
        b = rf.bytes_per_element
        mask = g.mask_elements(self.experts)
        flops = 2.0 * mask * d_model
        tokens_side = g.groups * g.group_tokens * d_model
        buffers = g.groups * self.experts * g.capacity * d_model
        product = float(rf.product_s(flops, b * (mask + tokens_side + buffers)))
        if self.mask_build == "fused":
            return product
        return product + self.relayout_s(rf, tokens, d_model) / 2

    def relayout_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """``eager`` einsums' copies into their batched products' layouts, both einsums of
        a rank: each ``[E, g C, d]`` buffer once (the dispatch output into expert-major
        rows, the combine input back to group-major) and one mask (read and written)."""
        g = self.groups(tokens)
        if not g.groups or self.mask_build == "fused":
            return 0.0
        b = rf.bytes_per_element
        buffers = g.groups * self.experts * g.capacity * d_model
        nbytes = 2 * b * (2 * buffers + g.mask_elements(self.experts))
        return float(rf.memory_s(nbytes)) + 2 * rf.overhead_s

    def dispatch_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """The rank's masks and its dispatch einsum (the gate/permute phase)."""
        return self.masks_s(rf, tokens) + self.einsum_s(rf, tokens, d_model)

    def combine_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """The rank's combine einsum (the combine phase)."""
        return self.einsum_s(rf, tokens, d_model)
