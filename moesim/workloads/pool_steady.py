"""A pool's steady state priced by the engine's own iteration cost (issue 16): the per-node
throughput of a prefill or decode instance when every data-parallel rank carries the same
full batch, without simulating the run that leads there.

A disaggregated run of a large deployment needs a long ramp (a decode sequence of ~1,200
tokens lives a minute) and prices the MoE layer at every batch size on the way; the steady
state needs one or two sizes. The iteration is the one the pool's engine would run
(:class:`moesim.cost.iteration.IterationCost`, through the two-micro-batch hooks when the
pool splits its batches), so the figures are the run's at that batch, not an estimate
beside it:

- **prefill**: every rank's ``tokens_per_rank`` new tokens are chunks of ``computed``
  tokens after ``cached`` ones (a prompt of ``cached + computed`` tokens whose prefix hit
  the cache), each chunk attending ``computed x cached + computed (computed + 1) / 2``
  keys and reading ``cached + computed`` tokens' KV; one token sampled per chunk;
- **decode**: every rank's ``seqs_per_rank`` sequences each compute one token after
  ``kv_tokens`` cached ones; with ``workload.speculative`` (k drafts) each verifies
  ``k + 1`` tokens after them (``(k + 1) c + (k + 1)(k + 2) / 2`` keys, ``c + k + 1`` KV
  tokens read, logits at ``k + 1`` positions), the drafter's ``k`` passes follow
  (:func:`moesim.cost.speculative.with_draft`), and a step yields the chain's expected
  ``1 + p1 + p1 p2 + ...`` tokens per sequence (the engine draws them; at steady state
  their mean is what the throughput sees).
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.cost.iteration import IterationCost, IterationTime
from moesim.cost.speculative import with_draft
from moesim.engine.dual_batch import dual_batch_hooks
from moesim.engine.layer_sim import simulated_layer_cost
from moesim.system import System, build_system
from moesim.workloads.pools import pool_scenario


@dataclass(frozen=True)
class SteadyPool:
    """One instance's steady iteration and what it yields per node."""

    iteration: IterationTime
    nodes: int
    tokens_per_s_per_node: float
    """Prefill: input tokens computed plus cache hits; decode: output tokens."""
    computed_tokens_per_s_per_node: float
    """Prefill: input tokens computed (no hits); decode: as above."""
    per_user_tokens_per_s: float
    """Decode: tokens per second each sequence sees (tokens per step / step); prefill: 0."""
    tokens_per_step: float = 1.0
    """Decode: tokens each sequence gains per step (1 without speculative decoding)."""


def _iteration(
    sub: System,
    micro_batches: int,
    batch: tuple[list[int], list[float], list[int], list[int]],
    draft: tuple[list[int], list[int]] | None = None,
) -> IterationTime:
    """The pool's iteration over ``batch``; ``draft``: the drafting sequences and their KV
    tokens per rank when the workload decodes speculatively."""
    cost = IterationCost(sub, simulated_layer_cost(sub))
    if micro_batches == 2:
        it = dual_batch_hooks(sub).iteration_time(cost, *batch)
    else:
        it = cost.time(*batch)
    w = sub.scenario.workload
    spec = w.speculative if isinstance(w, ServingWorkload) else None
    if draft is not None and spec is not None:
        it = with_draft(cost, it, spec, *draft)
    return it


def _pool(s: Scenario, name: str) -> tuple[System, int, int]:
    w = s.workload
    pools = getattr(w, "pools", None)
    if pools is None:
        raise ValueError(f"scenario {s.name!r} has no workload.pools")
    sub = build_system(pool_scenario(s, name))
    nodes = sub.scenario.cluster.nodes  # type: ignore[union-attr]
    return sub, nodes, getattr(pools, name).micro_batches


def prefill_steady(s: Scenario, tokens_per_rank: int, computed: int, cached: int) -> SteadyPool:
    """The prefill pool's instance with every rank full (see the module docstring)."""
    if computed < 1 or cached < 0 or tokens_per_rank < 1:
        raise ValueError("need computed >= 1, cached >= 0 and tokens_per_rank >= 1 tokens")
    sub, nodes, mb = _pool(s, "prefill")
    dp = sub.scenario.parallelism.dp
    chunks = tokens_per_rank / computed
    keys = chunks * (computed * cached + computed * (computed + 1) / 2)
    batch = (
        [tokens_per_rank] * dp,
        [keys] * dp,
        [round(chunks * (cached + computed))] * dp,
        [max(1, round(chunks))] * dp,
    )
    it = _iteration(sub, mb, batch)
    done = dp * tokens_per_rank / it.total_s / nodes
    return SteadyPool(it, nodes, done * (cached + computed) / computed, done, 0.0)


def decode_steady(s: Scenario, seqs_per_rank: int, kv_tokens: int) -> SteadyPool:
    """The decode pool's instance with every rank holding ``seqs_per_rank`` sequences of
    ``kv_tokens`` cached tokens each."""
    if seqs_per_rank < 1 or kv_tokens < 0:
        raise ValueError("need seqs_per_rank >= 1 and kv_tokens >= 0")
    sub, nodes, mb = _pool(s, "decode")
    dp = sub.scenario.parallelism.dp
    w = sub.scenario.workload
    spec = w.speculative if isinstance(w, ServingWorkload) else None
    q = 1 + (spec.draft_tokens if spec is not None else 0)  # query tokens per sequence
    m, c = seqs_per_rank, kv_tokens
    kv = m * (c + q)
    keys = float(m * (q * c + q * (q + 1) // 2))
    batch = ([m * q] * dp, [keys] * dp, [kv] * dp, [m * q] * dp)
    it = _iteration(sub, mb, batch, ([m] * dp, [kv] * dp) if spec is not None else None)
    per_step = spec.expected_tokens_per_step if spec is not None else 1.0
    rate = dp * m * per_step / it.total_s / nodes
    return SteadyPool(it, nodes, rate, rate, per_step / it.total_s, per_step)
