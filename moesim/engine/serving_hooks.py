"""What may change a serving run from outside the serving loop: :class:`ServingHooks`
(ranks dying and coming back, requests requeued or lost, iterations costed per failure
state) and its no-op, :class:`HealthyServing` (nothing fails), which
:func:`moesim.engine.serving.simulate_serving` uses when it is given no hooks.

The failures package (above the engine) implements the protocol
(:class:`moesim.failures.serving.ServingFailures`); the engine never imports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from moesim.cost.iteration import IterationCost, IterationTime
from moesim.derived.serving_memory import ServingMemory
from moesim.engine.batching import RankScheduler, RequestState


class ServingHooks(Protocol):
    """The serving loop's hooks, called in this order: :meth:`kv_blocks` once, then per
    arrival :meth:`rank_for` (and :meth:`hold` when it gives no rank), per iteration
    :meth:`advance` and :meth:`iteration_time`, and :meth:`records` at the end."""

    def kv_blocks(self, mem: ServingMemory, blocks: int) -> int:
        """KV blocks of one data-parallel rank (``blocks`` without the hook)."""
        ...

    def rank_for(self, rid: int, now_s: float) -> int | None:
        """The rank a new request goes to; None when no rank can take it now."""
        ...

    def hold(self, rid: int) -> None:
        """Keep a request :meth:`rank_for` found no rank for, until a rank can take it."""
        ...

    def advance(
        self,
        now_s: float,
        ranks: Sequence[RankScheduler],
        state: RequestState,
        rank_of: np.ndarray,
    ) -> float:
        """Before an iteration: apply what changed up to ``now_s`` (moving requests between
        ranks, updating ``rank_of``); the time to wait before the next iteration can run
        (0: run it now; inf: never)."""
        ...

    def iteration_time(
        self,
        cost: IterationCost,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        """The iteration's time; ``cost`` is the healthy system's iteration cost."""
        ...

    def records(self, requests: int) -> Any:
        """What the hooks did, for :attr:`ServingRecords.failures` (None: nothing)."""
        ...


class HealthyServing:
    """The no-op hooks: nothing fails; requests go round-robin over the ``dp`` ranks in
    arrival order and every iteration costs what the healthy system says."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def kv_blocks(self, mem: ServingMemory, blocks: int) -> int:
        return blocks

    def rank_for(self, rid: int, now_s: float) -> int | None:
        return rid % self.dp

    def hold(self, rid: int) -> None:  # pragma: no cover - rank_for always gives a rank
        raise AssertionError("a healthy server always has a rank for a request")

    def advance(
        self,
        now_s: float,
        ranks: Sequence[RankScheduler],
        state: RequestState,
        rank_of: np.ndarray,
    ) -> float:
        return 0.0

    def iteration_time(
        self,
        cost: IterationCost,
        tokens: list[int],
        keys: list[float],
        kv_read_tokens: list[int],
        sampled: list[int],
    ) -> IterationTime:
        return cost.time(tokens, keys, kv_read_tokens, sampled)

    def records(self, requests: int) -> Any:
        return None
