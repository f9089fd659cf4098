"""moesim against the measured batch-1 offloaded decode on one H200 (held out).

Source: moesim/catalog/measurements/h200_offload_decode_2026-12-03/ (``python3 -m
moesim.calibrate.torch_offload_decode``, torch 2.11, transformers 5.17, 2026-12-03): a
Mixtral-shaped 8-layer decode driven by the routing trace recorded in the same run, per-layer
LRU over 16/32/48/64 HBM expert slots over pinned host memory. The only fitted number is the
eager runtime's host time per decoder layer, on the ``attention_only`` run; every MoE run is
held out. docs/routing-fidelity.md tabulates it.
"""

from __future__ import annotations

import json

import pytest

from moesim.calibrate.offload_fidelity import MEASUREMENTS, compare, predict, records
from moesim.calibrate.torch_offload_decode import LayerCache, hottest, split_slots
from moesim.calibrate.torch_routing import Trace

TRACE = MEASUREMENTS.parent / "mixtral-l8.decode.jsonl"


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    return compare()


def _trace() -> Trace:
    t = Trace()
    for line in TRACE.read_text().splitlines():
        t.experts.append(json.loads(line)["experts"])
    return t


def test_recorded_hits_follow_the_harness_cache() -> None:
    """Replaying the trace through the harness's LRU gives the recorded hit counts."""
    trace = _trace()
    hot = hottest(trace, 8, 8)
    for r in records():
        if r.get("mode") != "lru":
            continue
        free = list(range(r["slots"]))
        caches = []
        for j, n in enumerate(split_slots(r["slots"], 8)):
            caches.append(LayerCache(n, free[:n], hot[j]))
            free = free[n:]
        hits = sum(
            len(caches[j].use(sorted(trace.experts[t][j]))[0])
            for t in range(r["tokens"])
            for j in range(8)
        )
        assert hits == r["hits"], r["slots"]


def test_hit_rate_matches_at_every_cache_size(result) -> None:  # type: ignore[no-untyped-def]
    _, rows = result
    assert [r.slots for r in rows] == [16, 32, 48, 64]
    for r in rows:
        assert r.predicted_hit == pytest.approx(r.measured_hit, abs=1e-4), r.slots


def test_ms_per_token_within_10_percent(result) -> None:  # type: ignore[no-untyped-def]
    """32 and 48 slots and the all-hit case (64) within 10%."""
    host, rows = result
    assert 100 < host < 250  # us per decoder layer, fitted on the attention-only decode
    for r in rows:
        if r.slots >= 32:
            assert abs(r.error) <= 0.10, (r.slots, r.error)


def test_16_slots_is_a_documented_miss(result) -> None:  # type: ignore[no-untyped-def]
    """At 16 slots the measured copies ran at about half the rate of every other run (10-13
    ms per miss against 6.15 ms at 32/48 slots and 6.35 ms in the copy microbenchmark), so
    moesim is ~35% under there (docs/routing-fidelity.md). Pinned so a change shows."""
    _, rows = result
    (r,) = [r for r in rows if r.slots == 16]
    assert -0.45 < r.error < -0.25


def test_without_the_host_time_the_all_hit_decode_is_a_third_fast() -> None:
    """The all-hit mechanism: the ideal engine prices the decode's attention blocks at
    their device time, but an eager batch-1 decode is host-bound."""
    (allhit,) = [r for r in records() if r.get("mode") == "lru" and r["slots"] == 64]
    ms, hit = predict(64, 0.0, allhit["tokens"])
    assert hit == 1.0
    assert -0.40 < ms / allhit["ms_per_token"] - 1 < -0.25
