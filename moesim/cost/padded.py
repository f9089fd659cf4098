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

- building the masks: writing each ``[s, E, C]`` mask once at the activation width
  (a memory-bound kernel each; the ``[s, E]`` one-hot and cumulative sum are ``C`` times
  smaller and not counted);
- each einsum: one matrix-product kernel of ``2 g s E C d`` FLOPs reading its mask, its
  activations and writing its output;
- experts: per projection one batched product over the local experts' equal row counts
  (rows rounded up to the product row tile), and the activation over every row.
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

    @classmethod
    def of(cls, policies: PoliciesConfig, model: ModelConfig) -> PaddedExperts | None:
        """The padded layout of ``policies`` (None for grouped expert compute)."""
        if policies.expert_compute != "padded":
            return None
        if policies.capacity_factor is None:  # the config rejects it; kept for type narrowing
            raise ValueError("padded expert compute needs a capacity_factor")
        return cls(policies.capacity_factor, policies.group_size, model.experts, model.top_k)

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
        """Building a rank's dispatch and combine masks: each ``[s, E, C]`` mask of every
        group written once at the activation width (one memory-bound kernel per mask)."""
        g = self.groups(tokens)
        if not g.groups:
            return 0.0
        nbytes = g.mask_elements(self.experts) * rf.bytes_per_element
        return 2 * float(rf.memory_s(nbytes))

    def einsum_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """One dispatch or combine einsum of a rank over its masks: ``2 g s E C d`` FLOPs
        on the matrix units, reading the mask and the ``[s, d]`` side, writing (or
        reading) the ``[E, C, d]`` buffers."""
        g = self.groups(tokens)
        if not g.groups:
            return 0.0
        mask = g.mask_elements(self.experts)
        flops = 2.0 * mask * d_model
        tokens_side = g.groups * g.group_tokens * d_model
        buffers = g.groups * self.experts * g.capacity * d_model
        return float(rf.product_s(flops, rf.bytes_per_element * (mask + tokens_side + buffers)))

    def dispatch_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """The rank's masks and its dispatch einsum (the gate/permute phase)."""
        return self.masks_s(rf, tokens) + self.einsum_s(rf, tokens, d_model)

    def combine_s(self, rf: Roofline, tokens: int, d_model: int) -> float:
        """The rank's combine einsum (the combine phase)."""
        return self.einsum_s(rf, tokens, d_model)


def padded_ffn_s(
    rf: Roofline, rows_per_expert: np.ndarray, d_model: int, d_ff: int, activation: str
) -> float:
    """The experts of one device over their padded buffers: per projection one batched
    product over the local experts (``[E, rows, d] x [E, d, f]``, rows rounded up to the
    product row tile), and the activation over every row. ``d_ff`` is this device's
    shard; experts with no rows are skipped."""
    n = np.asarray(rows_per_expert, dtype=float)
    n = n[n > 0]
    if not n.size:
        return 0.0
    b = rf.bytes_per_element
    up_n = (2 if activation in ("swiglu", "geglu") else 1) * d_ff
    rows = float(n.sum())
    tiled = float((np.ceil(n / rf.m_tile) * rf.m_tile).sum())
    experts = n.size

    def product(k: int, out: int) -> float:
        nbytes = b * (rows * k + experts * k * out + rows * out)
        return float(rf.product_s(2.0 * tiled * k * out, nbytes))

    act = float(rf.activation_s(rows, d_ff, activation))
    return product(d_model, up_n) + act + product(d_ff, d_model)
