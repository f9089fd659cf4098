"""Steady decode iterations (``RankScheduler(lazy=True)``) change no figure: the lazy
scheduler chooses the same batches, holds the same KV blocks and leaves the same
per-request state as the eager one, including under KV pressure (block crossings,
preemption) and with requests arriving while others decode."""

from __future__ import annotations

import random

import pytest

from moesim.config.serving import SchedulerConfig
from moesim.engine.batching import RankScheduler, RequestState


def _play(lazy: bool, cfg: SchedulerConfig, blocks: int, seed: int) -> tuple[list, RequestState]:
    gen = random.Random(seed)
    n = 60
    arrivals = sorted(gen.randrange(0, 400) for _ in range(n))
    prompt = [gen.randrange(1, 90) for _ in range(n)]
    output = [gen.randrange(1, 70) for _ in range(n)]
    state = RequestState([float(a) for a in arrivals], prompt, output)
    rank = RankScheduler(state, cfg, blocks, lazy=lazy)
    trace = []
    nxt = 0
    for step in range(3000):
        while nxt < n and arrivals[nxt] <= step:
            rank.waiting.append(nxt)
            nxt += 1
        if not rank.busy:
            if nxt == n:
                break
            continue
        b = rank.schedule(float(step))
        used = rank.used_blocks
        emitted = rank.complete(b, step + 0.5)
        trace.append(
            (
                step,
                b.tokens,
                b.keys,
                b.kv_read_tokens,
                b.sampled,
                b.decodes,
                len(b.ids),
                used,
                emitted,
            )
        )
    rank.sync()
    return trace, state


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("cfg", "blocks"),
    [
        (SchedulerConfig(block_tokens=16), 10_000),  # no KV pressure
        (SchedulerConfig(block_tokens=4), 60),  # preemptions
        (SchedulerConfig(block_tokens=16, max_batch_tokens=5, max_seqs=6), 40),
        (SchedulerConfig(block_tokens=8, requeue="back", admit_free_fraction=0.2), 50),
    ],
)
def test_lazy_scheduler_matches_the_eager_one(cfg: SchedulerConfig, blocks: int, seed: int) -> None:
    eager, s1 = _play(False, cfg, blocks, seed)
    lazy, s2 = _play(True, cfg, blocks, seed)
    assert lazy == eager
    assert s1 == s2


def test_steady_iterations_are_taken() -> None:
    """Without arrivals, decodes run steady until the first request finishes."""
    state = RequestState([0.0, 0.0], [10, 20], [30, 50])
    rank = RankScheduler(state, SchedulerConfig(block_tokens=16), 100, lazy=True)
    rank.waiting.extend([0, 1])
    steady = 0
    while rank.busy:
        b = rank.schedule(0.0)
        steady += b.steady
        rank.complete(b, 1.0)
    rank.sync()
    assert state.generated == [30, 50] and steady == 28 + 19  # all but 3 iterations
