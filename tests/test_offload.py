"""Expert offloading and ZeRO-Offload: limits, closed forms, skew and drift, located errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moesim
from moesim.catalog import hardware
from moesim.cost.offload import (
    ExpertOffload,
    optimizer_offload,
    pageable_fraction,
    tier_rates,
    touched_experts,
)
from moesim.errors import ScenarioError
from moesim.loader import load_scenario
from moesim.routing.distributions import drifted
from moesim.system import build_system
from moesim.topology.graph import rate

BASE = """\
name: offload-test
seed: 4
cluster: {cluster}
model: mixtral-8x7b
routing: {routing}
parallelism: {{dp: 1, ep: 1}}
policies:
  capacity_factor: null
  overflow: dropless
  offload:
    experts:
      {experts}
workload:
  kind: serving
  duration_s: 3
  warmup_s: 0.5
  arrival: {{kind: poisson, rate_per_s: 2}}
  prompt_tokens: {{kind: constant, value: 64}}
  output_tokens: {{kind: constant, value: 4}}
  scheduler: {{max_batch_tokens: 1024, max_seqs: 8, block_tokens: 16}}
"""

HOT = "{kind: hot, hot_fraction: 0.25, hot_share: 0.9}"


def _scenario(
    write,
    experts: str,
    routing: str = "{kind: uniform}",
    cluster: str = "workstation-a5000",
    overrides: tuple[str, ...] = (),
) -> moesim.Scenario:
    text = BASE.format(cluster=cluster, routing=routing, experts=experts)
    return load_scenario(write("s.yaml", text), overrides)


def _offload(write, experts: str, routing: str = "{kind: uniform}", **kw) -> ExpertOffload:
    s = _scenario(write, experts, routing, **kw)
    cfg = s.policies.offload.experts
    assert cfg is not None
    return ExpertOffload(build_system(s), cfg)


def _run(off: ExpertOffload, steps: int, tokens: int, dt: float = 0.1, **times: float) -> float:
    """Total stall of ``steps`` iterations of ``tokens`` tokens, one every ``dt`` s."""
    a, m, d = times.get("attention", 1e-4), times.get("moe", 1e-3), times.get("dense", 0.0)
    return sum(off.step(i * dt, tokens, a, m, d) for i in range(steps))


def _hit(off: ExpertOffload) -> float:
    return off.totals.hbm_hits / off.totals.accesses


EXPERT_BYTES = 3 * 4096 * 14336 * 2  # Mixtral-8x7B expert: gate, up, down of 4096 x 14336, bf16


def test_cache_holding_every_expert_never_misses(write) -> None:
    """Limit: a cache of all of a device's experts (the largest allowed) is never missed,
    for any policy, skew or batch, with or without prefetch, and adds no stall (on an
    H200 the 256 experts fit)."""
    for policy in ("lru", "lfu", "static"):
        for pre in ("", ", prefetch: {accuracy: 0.5}"):
            off = _offload(
                write, f"{{policy: {policy}, cache_experts: 256{pre}}}", HOT, cluster="single-h200"
            )
            assert _run(off, 20, 37) == 0.0
            t = off.totals
            assert t.accesses > 0 and t.hbm_hits == t.accesses and t.bytes_moved == 0
            assert t.late_prefetch == t.prefetch_copies == 0


def test_full_cache_serving_matches_all_in_hbm(write) -> None:
    """End to end: with a cache holding every expert, serving latencies equal those of
    the same run without offloading."""
    s = _scenario(write, "{policy: lru, cache_experts: 256}", HOT, cluster="single-h200")
    text = BASE.format(cluster="single-h200", routing=HOT, experts="null")
    plain = load_scenario(write("p.yaml", text.replace("experts:\n      null", "experts: null")))
    a, b = moesim.run(s).summary, moesim.run(plain).summary
    assert a["offload"]["hit_rate"]["hbm"] == 1.0 and a["offload"]["stall_s"] == 0.0
    assert a["ttft_ms"] == b["ttft_ms"] and a["tpot_ms"] == b["tpot_ms"]


def test_static_cache_hits_more_with_hot_routing(write) -> None:
    """Skew matters: pinning the hottest experts pays off when a few experts get most
    tokens (hot: 2 of 8 experts take 90%), not under uniform routing."""
    hot = _offload(write, "{policy: static, cache_experts: 96}", HOT, cluster="single-h200")
    uni = _offload(write, "{policy: static, cache_experts: 96}", cluster="single-h200")
    _run(hot, 30, 1)
    _run(uni, 30, 1)
    # closed form for one token, uniform: 2 of 8 experts per block, (96 - 8) / 32 = 2.75
    # pinned per block on average -> hit rate 2.75 / 8
    assert _hit(uni) == pytest.approx(88 / 32 / 8, abs=0.06)
    assert _hit(hot) > _hit(uni) + 0.3


ZIPF = "{kind: zipf, s: 1.0}"


@pytest.mark.parametrize(
    ("cluster", "cache", "routing", "tokens"),
    [
        ("workstation-a5000", 48, ZIPF, 2),  # the A5000 example: 1-2 slots per block
        ("workstation-a5000", 48, ZIPF, 16),
        ("single-h200", 96, "{kind: zipf, s: 0.5}", 4),
        ("single-h200", 160, HOT, 16),
    ],
)
def test_lfu_approaches_static_under_stationary_routing(
    write, cluster: str, cache: int, routing: str, tokens: int
) -> None:
    """With a fixed popularity, LFU's counts converge to its ranking, so over a long run
    LFU hits within a few points of pinning the hottest experts (static), and well above
    LRU (which admits every miss). Admitting every miss made LFU evict a block's hot
    expert for each cold one a layer touched (12.9% vs static's 33.9% on the A5000)."""
    rates = {}
    for policy in ("static", "lfu", "lru"):
        off = _offload(
            write, f"{{policy: {policy}, cache_experts: {cache}}}", routing, cluster=cluster
        )
        _run(off, 200, tokens)
        rates[policy] = _hit(off)
    assert rates["static"] > 0.2
    assert rates["lfu"] == pytest.approx(rates["static"], abs=0.03)
    assert rates["lfu"] >= rates["lru"]


def test_lfu_admits_only_more_frequent_experts(write) -> None:
    """Unit: a one-slot LFU part keeps its expert against a newcomer used no more often,
    and lets it in once the newcomer's count (kept while it is not resident) is higher;
    LRU always admits."""
    from moesim.cost.offload import Tier

    lfu, lru = Tier("lfu", 1, [], [0]), Tier("lru", 1, [], [0])
    for tier in (lfu, lru):
        tier.touch(0)
        tier.touch(1)
    assert not lfu.admit(1, set()) and 0 in lfu and 1 not in lfu
    assert lru.admit(1, set()) and 1 in lru and 0 not in lru
    lfu.touch(1)
    assert lfu.admit(1, set()) and 1 in lfu and 0 not in lfu


def test_drift_lowers_lru_hit_rate(write) -> None:
    """Drift matters: when the hot set moves every iteration an LRU cache keeps missing;
    with a fixed hot set it settles on it."""
    drift = HOT.replace("}", ", drift: {period_s: 0.05}}")
    fixed = _offload(write, "{policy: lru, cache_experts: 96}", HOT, cluster="single-h200")
    moving = _offload(write, "{policy: lru, cache_experts: 96}", drift, cluster="single-h200")
    _run(fixed, 60, 1)
    _run(moving, 60, 1)
    assert _hit(fixed) > 0.8
    assert _hit(moving) < _hit(fixed) - 0.2


def test_drift_rotates_popularity() -> None:
    """A whole shift moves every expert's weight to its neighbour; halfway interpolates."""
    p = np.array([0.5, 0.3, 0.2])
    assert drifted(p, 1.0).tolist() == [0.2, 0.5, 0.3]
    assert drifted(p, 3.0).tolist() == p.tolist()
    assert drifted(p, 0.5) == pytest.approx([0.35, 0.4, 0.25])


def test_prefetch_with_perfect_prediction_hides_every_copy(write) -> None:
    """With accuracy 1 and attention long enough to hide the copies, the stall is zero;
    with accuracy 0 every miss still stalls (and the guesses waste bandwidth)."""
    times = {"attention": 0.5, "moe": 1e-3}
    good = _offload(write, "{policy: lru, cache_experts: 48, prefetch: {accuracy: 1.0}}")
    bad = _offload(write, "{policy: lru, cache_experts: 48, prefetch: {accuracy: 0.0}}")
    none = _offload(write, "{policy: lru, cache_experts: 48}")
    assert _run(good, 5, 3, **times) == pytest.approx(0.0, abs=1e-12)
    assert good.totals.wasted_prefetch_bytes == 0 and good.totals.prefetch_copies > 0
    # every prefetch landed in time: each use is an HBM hit, none waited
    assert good.totals.hbm_hits == good.totals.accesses and good.totals.late_prefetch == 0
    assert good.totals.prefetch_on_time == good.totals.prefetch_useful > 0
    stall_bad = _run(bad, 5, 3, **times)
    assert stall_bad > 1.0 and bad.totals.wasted_prefetch_bytes > 0
    assert _run(none, 5, 3, **times) > 0.5


def test_prefetch_still_in_flight_is_no_hit(write) -> None:
    """A use whose prefetch is still being copied when its layer starts waits for it: it is
    counted as in flight, not as an HBM hit. With perfect prediction but copies (~11 ms)
    far slower than a layer (~1 ms), every non-pinned use is such a late prefetch, so the
    HBM hits are exactly the static pins' (the routing draws are the same as without
    prefetch), the per-tier shares add up to one, and the stall is still large, only less
    than without prefetch (each copy starts earlier)."""
    pre = _offload(write, "{policy: static, cache_experts: 40, prefetch: {accuracy: 1.0}}", ZIPF)
    none = _offload(write, "{policy: static, cache_experts: 40}", ZIPF)
    stall_pre, stall_none = _run(pre, 10, 3), _run(none, 10, 3)
    t, u = pre.totals, none.totals
    assert t.accesses == u.accesses and t.hbm_hits == u.hbm_hits < t.accesses
    assert t.late_prefetch == t.accesses - t.hbm_hits == t.prefetch_useful
    assert t.dram_hits == t.nvme_reads == t.prefetch_on_time == 0
    assert 0.5 * stall_none < stall_pre < stall_none
    s = pre.summary(np.full(10, 1.0))
    h = s["hit_rate"]
    assert h["hbm"] == pytest.approx(_hit(pre), abs=1e-6) and s["prefetched_share"] == 0
    assert sum(h.values()) == pytest.approx(1.0, abs=1e-5) and h["in_flight"] > 0.5


def test_stall_per_miss_is_bytes_over_bandwidth(write) -> None:
    """Closed form: without overlap, every miss stalls its layer by latency + expert bytes /
    rate, the rate being the A5000's PCIe Gen4 x16 (27.5 GB/s: its datasheet 31.5 GB/s at
    Gen5's measured efficiency; below the host's 102.4 GB/s of DRAM)."""
    off = _offload(write, "{policy: lru, cache_experts: 8, overlap: false}")
    link = hardware.link("pcie-gen4-x16")
    per_miss = link.latency_us * 1e-6 + EXPERT_BYTES / (rate(link) * 1e9)
    assert off.expert_bytes == EXPERT_BYTES and off.copy_s(False) == pytest.approx(per_miss)
    stall = _run(off, 10, 5)
    misses = off.totals.accesses - off.totals.hbm_hits
    assert misses > 0 and off.totals.dram_hits == misses
    assert stall == pytest.approx(misses * per_miss, rel=1e-9)
    assert off.totals.bytes_moved == misses * EXPERT_BYTES


def test_pageable_copies_use_the_measured_ratio(write) -> None:
    """Pageable host buffers copy at the measured 1 GiB pageable/pinned ratio (19.06 / 54.88
    GB/s on H100 PCIe Gen5) of the link rate."""
    assert pageable_fraction() == pytest.approx(19.062 / 54.879, rel=1e-3)
    s = _scenario(write, "{policy: lru, cache_experts: 48, host_memory: pageable}")
    assert tier_rates(s, "pageable").dram_bps == pytest.approx(27.5e9 * pageable_fraction())


def test_nvme_tier_when_dram_is_capped(write) -> None:
    """Experts that do not fit the DRAM given to them are read from NVMe at the drive's
    rate (7.45 GB/s < PCIe), and DRAM caches them."""
    off = _offload(write, "{policy: lru, cache_experts: 48, dram_gib: 20}")
    _run(off, 10, 8)
    t = off.totals
    assert t.nvme_reads > 0 and t.dram_hits > 0
    assert t.hbm_hits + t.late_prefetch + t.dram_hits + t.nvme_reads == t.accesses
    assert off.rates.nvme_bps == pytest.approx(7.45e9)


def test_touched_experts_limits() -> None:
    """One token touches exactly top_k experts per layer; many tokens touch all."""
    rng = np.random.default_rng(0)
    p = np.full(8, 1 / 8)
    one = touched_experts(rng, p, 1, 2, 32)
    assert (one.sum(axis=1) == 2).all()
    assert touched_experts(rng, p, 100_000, 2, 32).all()
    assert not touched_experts(rng, p, 0, 2, 4).any()


def test_touched_tail_estimate_matches_exact_sampling(monkeypatch) -> None:
    """Beyond EXACT_TOKENS the rare experts' inclusion estimate gives the same expected
    number of touched experts as sampling every token (skewed: Dirichlet(0.3))."""
    import moesim.cost.offload as off

    p = np.random.default_rng(5).dirichlet(np.full(64, 0.3))
    hybrid = touched_experts(np.random.default_rng(1), p, 1000, 4, 300).sum(axis=1).mean()
    monkeypatch.setattr(off, "EXACT_TOKENS", 10**9)
    exact = touched_experts(np.random.default_rng(2), p, 1000, 4, 300).sum(axis=1).mean()
    assert hybrid == pytest.approx(exact, rel=0.01)


def test_same_seed_same_result(write) -> None:
    """Determinism: the same scenario and seed give the same offloading and latencies."""
    s = _scenario(write, "{policy: lfu, cache_experts: 40, prefetch: {accuracy: 0.7}}", HOT)
    a, b = moesim.run(s).summary, moesim.run(s).summary
    assert a["offload"] == b["offload"] and a["ttft_ms"] == b["ttft_ms"]
    assert a["offload"]["stall_share"] > 0
    assert a["time_breakdown_s"]["offload_stall"] == a["offload"]["stall_s"]


def test_offloading_slows_serving_down(write) -> None:
    """A small cache stalls: TPOT grows over the all-in-HBM run on the same H200."""
    small = _scenario(write, "{policy: lru, cache_experts: 16}", cluster="single-h200")
    full = _scenario(write, "{policy: lru, cache_experts: 256}", cluster="single-h200")
    a, b = moesim.run(small).summary, moesim.run(full).summary
    assert a["tpot_ms"]["p50"] > b["tpot_ms"]["p50"]
    assert a["ttft_ms"]["p50"] > b["ttft_ms"]["p50"]


# --- located errors --------------------------------------------------------------------


def _errors(path: Path) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [str(i) for i in info.value.issues]


def _bad(write, experts: str, **kw: str) -> tuple[Path, list[str]]:
    text = BASE.format(
        cluster=kw.get("cluster", "workstation-a5000"),
        routing="{kind: uniform}",
        experts=experts,
    )
    p = write("bad.yaml", text)
    return p, _errors(p)


def test_cache_larger_than_hbm_is_rejected_at_its_line(write) -> None:
    """70 experts (23 GiB) plus 3 GiB of other weights exceed the A5000's 24 GB."""
    p, errs = _bad(write, "{policy: lru, cache_experts: 70}")
    assert len(errs) == 1
    assert errs[0].startswith(f"{p}:12:") and "policies.offload.experts.cache_experts" in errs[0]
    assert "does not fit in HBM" in errs[0]


@pytest.mark.parametrize(
    ("cluster", "ep", "experts", "expect"),
    [
        # 48 given as if for the whole model: 32 blocks x 8 experts / ep 8 = 32 per device
        ("dgx-h100", 8, "{policy: static, cache_experts: 48}", "more than the 32 experts"),
        ("single-h200", 1, "{policy: lru, cache_experts: 300}", "more than the 256 experts"),
        ("workstation-a5000", 1, "{policy: lru, cache_experts: 300}", "more than the 256"),
        ("single-h200", 1, "{policy: lfu, cache_experts: 257}", "at most 256 (which keeps"),
        ("single-h200", 1, "{policy: lru, cache_gib: 100}", "at most 84.00 GiB"),
    ],
)
def test_cache_larger_than_the_device_experts_is_rejected(
    write, cluster: str, ep: int, experts: str, expect: str
) -> None:
    """The cache is per device: more than the device's experts (MoE blocks x experts /
    ep) is an error at the capacity's line that names the maximum (not clamped)."""
    text = BASE.format(cluster=cluster, routing="{kind: uniform}", experts=experts)
    p = write("big.yaml", text.replace("{dp: 1, ep: 1}", f"{{dp: 1, ep: {ep}}}"))
    errs = _errors(p)
    field = "cache_experts" if "cache_experts" in experts else "cache_gib"
    ours = [e for e in errs if "the cache is per device" in e]
    assert len(ours) == 1, errs
    assert ours[0].startswith(f"{p}:12:") and f"policies.offload.experts.{field}" in ours[0]
    assert expect in ours[0] and "32 MoE blocks" in ours[0], ours[0]


def test_cache_below_one_expert_is_rejected(write) -> None:
    """0.2 GiB holds no whole Mixtral expert (0.328 GiB)."""
    p, errs = _bad(write, "{policy: lru, cache_gib: 0.2}")
    assert any(
        e.startswith(f"{p}:12:") and "cache_gib: holds no whole expert" in e for e in errs
    ), errs


def test_capacity_must_be_given_once(write) -> None:
    p, errs = _bad(write, "{policy: lru, cache_experts: 8, cache_gib: 4}")
    assert errs == [
        f"{p}:11:5: policies.offload.experts: give exactly one of cache_experts and cache_gib"
    ]


def test_prefetch_without_overlap_is_rejected(write) -> None:
    _, errs = _bad(
        write, "{policy: lru, cache_experts: 48, overlap: false, prefetch: {accuracy: 1}}"
    )
    assert any("policies.offload.experts.prefetch" in e and "overlap" in e for e in errs), errs


def test_dram_too_small_and_no_nvme(write) -> None:
    """More DRAM than the host has, and experts spilling to a host without NVMe."""
    _, errs = _bad(write, "{policy: lru, cache_experts: 48, dram_gib: 512}")
    assert any("dram_gib" in e and "exceeds the host's DRAM" in e for e in errs), errs
    _, errs = _bad(write, "{policy: lru, cache_experts: 48}", cluster="single-host-cpu")
    assert any("policies.offload.experts" in e for e in errs), errs


def test_optimizer_offload_only_for_training(write) -> None:
    text = BASE.format(cluster="single-h200", routing="{kind: uniform}", experts="null")
    text = text.replace("    experts:\n      null\n", "    optimizer: true\n")
    p = write("o.yaml", text)
    errs = _errors(p)
    assert any(e.startswith(f"{p}:") and "policies.offload.optimizer" in e for e in errs), errs


# --- training: ZeRO-Offload --------------------------------------------------------------


def test_zero_offload_moves_states_and_costs_transfers() -> None:
    """The optimizer states leave the device; the step pays gradients out and weights in
    at the host link's rate and the CPU Adam step at host DRAM bandwidth (closed form)."""
    ci = ["workload.seq_len=256", "workload.microbatches=4"]
    path = str(Path(__file__).resolve().parent.parent / "scenarios" / "mixtral-training-h100.yaml")
    base = moesim.run(load_scenario(path, ci)).summary
    s = load_scenario(path, [*ci, "policies.offload.optimizer=true"])
    off = moesim.run(s).summary
    assert off["memory_gib"]["optimizer"] == 0 and base["memory_gib"]["optimizer"] > 0
    host_gib = off["offload"]["optimizer_on_host_gib"]
    assert host_gib == pytest.approx(base["memory_gib"]["optimizer"], abs=1e-3)
    w = s.workload
    params = host_gib * 2**30 / 12
    o = optimizer_offload(s, w, params)  # type: ignore[arg-type]
    link = hardware.link("pcie-gen5-x16")
    assert o.grad_d2h_s == pytest.approx(2.9e-6 + 2 * params / (55.0e9))
    assert o.cpu_step_s == pytest.approx(8 * params * (2 * 12 + 4) / 614.4e9)
    assert link.effective_bandwidth_gbps == 55.0
    assert off["breakdown_ms"]["other"] == pytest.approx(o.total_s * 1e3, rel=1e-3)
    assert off["step_time_ms"] > base["step_time_ms"]


def test_training_streams_uncached_experts_each_pass() -> None:
    """Closed form: a stage device owning 8 experts (8 blocks x 8 experts / ep 8) with one
    cached streams 7 per pass at 2.9 us + 352 MB / 55 GB/s each (PCIe Gen5 pinned, below
    the DGX host's DRAM share); at 256-token micro-batches every pass is copy-bound, so
    each stage pass takes exactly that."""
    path = str(Path(__file__).resolve().parent.parent / "scenarios" / "mixtral-training-h100.yaml")
    over = [
        "workload.seq_len=256",
        "workload.microbatches=4",
        "policies.offload.optimizer=true",
        "policies.offload.experts={policy: static, cache_experts: 1}",
    ]
    summary = moesim.run(load_scenario(path, over)).summary
    o = summary["offload"]
    copy_ms = 7 * (2.9e-6 + EXPERT_BYTES / 55e9) * 1e3
    assert o["streamed_experts_per_pass"] == 7
    assert o["expert_copy_ms_per_pass"] == pytest.approx(copy_ms, rel=1e-6)
    assert o["copy_bound_passes"] == 8
    for st in summary["stage_ms"]:
        assert st["forward"] == pytest.approx(copy_ms, rel=1e-6)
    assert sum(summary["breakdown_ms"].values()) == pytest.approx(summary["step_time_ms"])


def test_training_expert_offload_needs_zero_offload(write) -> None:
    """Streamed experts are updated on the host: without optimizer offload it is an error,
    located at the offload block."""
    text = Path(__file__).resolve().parent.parent / "scenarios" / "mixtral-training-h100.yaml"
    body = text.read_text().replace(
        "policies: {capacity_factor: 1.25, overflow: drop}",
        "policies:\n  capacity_factor: 1.25\n  offload:\n    experts: {policy: lru, cache_experts: 4}",
    )
    p = write("t.yaml", body)
    errs = _errors(p)
    assert any(e.startswith(f"{p}:") and "policies.offload.optimizer" in e for e in errs), errs
