"""moesim against the measured batch-1 offloaded decode on one H200 (held out).

Source: moesim/catalog/measurements/h200_offload_decode_2026-12-03/ (``python3 -m
moesim.calibrate.torch_offload_decode``, torch 2.11, transformers 5.17, driver 580.159.04,
2026-12-03): a Mixtral-shaped 8-layer decode driven by a recorded routing trace, per-layer
LRU over 16/32/48/64 HBM expert slots over pinned host memory. Two record files:
``offload_decode_shuffled_2026-12-03.jsonl`` (the default: every slot count three times in
a seeded shuffle, copy-rate probes before and after every run) and ``offload_decode.jsonl``
(the first measurement, each slot count once, 16 slots first). The only fitted number is
the eager runtime's host time per decoder layer, on each file's ``attention_only`` run;
every MoE run is held out. docs/routing-fidelity.md tabulates both.
"""

from __future__ import annotations

import pytest

from moesim.calibrate.offload_fidelity import (
    FIRST,
    MEASUREMENTS,
    by_slots,
    compare,
    predict,
    records,
    replay_misses,
)
from moesim.calibrate.torch_offload_decode import LayerCache, hottest, load_trace, split_slots

TRACE = MEASUREMENTS.parent / "mixtral-l8.decode.jsonl"


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    return compare()


@pytest.fixture(scope="module")
def first():  # type: ignore[no-untyped-def]
    return compare(FIRST)


@pytest.mark.parametrize("path", [MEASUREMENTS, FIRST], ids=["shuffled", "first"])
def test_recorded_hits_follow_the_harness_cache(path) -> None:  # type: ignore[no-untyped-def]
    """Replaying the trace through the harness's LRU gives the recorded hit counts (and,
    where recorded, the per-token misses)."""
    trace = load_trace(str(TRACE))
    hot = hottest(trace, 8, 8)
    runs = [r for r in records(path) if r.get("mode") == "lru"]
    assert runs
    for r in runs:
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
        if "misses" in r:
            assert r["misses"] == replay_misses(TRACE, r["slots"], 8, 8, r["tokens"])


def test_runs_are_shuffled_and_probed() -> None:
    """The re-measurement: three runs per slot count, the 16-slot case not first, a copy
    probe around every run."""
    runs = [r for r in records() if r.get("mode") == "lru"]
    assert sorted(r["slots"] for r in runs) == sorted([16, 32, 48, 64] * 3)
    assert runs[0]["slots"] != 16
    assert all("probe_before" in r and "probe_after" in r for r in runs)


def test_hit_rate_matches_at_every_cache_size(result) -> None:  # type: ignore[no-untyped-def]
    _, rows = result
    assert {r.slots for r in rows} == {16, 32, 48, 64}
    for r in rows:
        assert r.predicted_hit == pytest.approx(r.measured_hit, abs=1e-4), r.slots


def test_copies_ran_at_the_catalog_rate(result) -> None:  # type: ignore[no-untyped-def]
    """Every probe read 54-56 GB/s (moesim's catalog: 55 GB/s pinned, a 6.41 ms copy per
    expert), and each run's cost per miss, the slope of its per-token times on its
    per-token misses, is 5.7-6.2 ms (part of each copy overlaps resident experts)."""
    _, rows = result
    for r in rows:
        assert r.probe_gb_s is not None
        assert all(54.0 < g < 56.0 for g in r.probe_gb_s), r.run_index
        if r.slots < 64:
            assert r.per_miss_ms is not None and 5.6 < r.per_miss_ms < 6.3, r.run_index


def test_copy_bound_decode_within_10_percent(result) -> None:  # type: ignore[no-untyped-def]
    """16 and 32 slots (44% and 76% hits, copies most of the time): every run within 10%,
    the 16-slot case included (-35% in the first measurement)."""
    host, rows = result
    assert 300 < host < 450  # us per decoder layer, fitted on the attention-only decode
    for r in rows:
        if r.slots <= 32:
            assert abs(r.error) <= 0.10, (r.run_index, r.slots, r.error)
    for s in by_slots(rows):
        if s.slots <= 32:
            assert abs(s.error) <= 0.05, s


def test_host_bound_runs_are_documented_misses(result) -> None:  # type: ignore[no-untyped-def]
    """48 and 64 slots are dominated by the eager loop's host time, which drifted upward
    over the session (the all-hit runs: 6.74, 8.51, 11.34 ms/token; the CUDA-graph replay
    of the same step stayed at 2.57 ms, as in the first session), and the first timed run
    (48 slots) carried ~40 ms/token of host time that is not in its copies. moesim is
    within 1% of the first all-hit run and 15-20% under the medians
    (docs/routing-fidelity.md). Pinned so a change shows."""
    _, rows = result
    med = {s.slots: s for s in by_slots(rows)}
    assert -0.25 < med[48].error < -0.10
    assert -0.25 < med[64].error < -0.15
    (first_run,) = [r for r in rows if r.run_index == 0]
    assert first_run.slots == 48 and first_run.error < -0.6
    allhit = sorted(r.measured_ms for r in rows if r.slots == 64)
    assert allhit[-1] > 1.5 * allhit[0]


def test_first_measurement(first) -> None:  # type: ignore[no-untyped-def]
    """The first measurement (kept): 32/48/64 within 10%; its 16-slot run, the first timed
    run of that session, -35%, with a cost per miss of 5.3 ms: the excess is per token
    (host time), not in the copies."""
    _, rows = first
    by = {r.slots: r for r in rows}
    for slots in (32, 48, 64):
        assert abs(by[slots].error) <= 0.10, slots
    assert -0.45 < by[16].error < -0.25
    assert by[16].per_miss_ms is not None and by[16].per_miss_ms < 6.0


def test_without_the_host_time_the_all_hit_decode_is_a_third_fast() -> None:
    """The all-hit mechanism: the ideal engine prices the decode's attention blocks at
    their device time, but an eager batch-1 decode is host-bound."""
    (allhit,) = [r for r in records(FIRST) if r.get("mode") == "lru" and r["slots"] == 64]
    ms, hit = predict(64, 0.0, allhit["tokens"])
    assert hit == 1.0
    assert -0.40 < ms / allhit["ms_per_token"] - 1 < -0.25
