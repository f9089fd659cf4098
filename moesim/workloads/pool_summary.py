"""The summary and energy of a run with prefill/decode pools.

End to end (the summary's top-level fields, as a co-located run reports them): a
request's TTFT runs from its arrival to the landing of its KV at the decode rank (the
prefill's first token reaches the user with it), its TPOT from there to its last token;
the output tokens are the prefill's first tokens and the decode's others, each counted
at the end of the iteration that sampled it.

Per pool (``pools.prefill``, ``pools.decode``), over the measurement window
``[warmup_s, duration_s]`` (iterations ending in it):

- prefill: ``input_tokens_per_s`` = input tokens / window, also per node of the pool:
  the prompt tokens prefilled in the window (recomputed ones included) plus the prefix
  cache hits of the requests whose prefill ended in it (DeepSeek's "input including
  cache hits"); ``computed_input_tokens_per_s_per_node`` without the hits and
  ``prefix_cache_hit_share``; the prefill-only TTFT (arrival to its first token sampled
  on the prefill rank, no transfer) and queue time;
- decode: ``output_tokens_per_s`` = tokens sampled by the decode pool / window (the
  first tokens come from prefill and are not counted here), also per node;
  ``per_user_tokens_per_s`` = 1 / TPOT of the measured requests of more than one output
  token (their decode speed as a user sees it, queueing at the decode rank included);
  ``step_ms`` the decode iterations' durations;
- both: instances, nodes, layout, iterations, mean batch tokens and running sequences
  per data-parallel rank, busy share, time breakdown (``moe_all_to_all``: the all-to-all time
  left exposed; with ``micro_batches: 2`` what the two-micro-batch timeline does not
  hide), KV cache size and use;
- ``kv_transfer``: bytes per request (per source device) and transfer time;
- ``goodput`` (with an SLO): the measured requests finished within both targets, and
  their output tokens, per second of the window and per node of the pools
  (:func:`goodput`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moesim.config.scenario import Scenario
from moesim.config.serving import ServingWorkload
from moesim.engine.pools import PoolRecords
from moesim.engine.serving import IterationRecords, RequestRecords, ServingRecords
from moesim.system import System
from moesim.workloads.pools import POOLS, pool_scenario


def _r(x: float, nd: int = 6) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def _stats(v: np.ndarray, scale: float = 1.0) -> dict[str, float | None]:
    v = v[np.isfinite(v)] * scale
    if not v.size:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": _r(p50), "p90": _r(p90), "p99": _r(p99), "mean": _r(float(v.mean()))}


def _iterations(recs: list[ServingRecords]) -> IterationRecords:
    """Every instance's iterations in one table by start time (KV blocks left out: the
    instances' ranks differ; the pools report their own)."""
    fields = [f.name for f in dataclasses.fields(IterationRecords) if f.name != "kv_blocks_used"]
    cols = {f: np.concatenate([getattr(r.iterations, f) for r in recs]) for f in fields}
    order = np.argsort(cols["start_s"], kind="stable")
    n = len(order)
    return IterationRecords(
        **{f: v[order] for f, v in cols.items()},
        kv_blocks_used=np.zeros((n, 0), dtype=np.int64),
    )


def end_to_end(rec: PoolRecords) -> ServingRecords:
    """The run as one server's records: requests end to end, every iteration of both pools."""
    pre = rec.prefill[0].requests
    n = len(pre.arrival_s)

    def pick(recs: list[ServingRecords], inst: np.ndarray, field: str, fill: float) -> np.ndarray:
        out = np.full(n, fill, dtype=float)
        for i, r in enumerate(recs):
            mine = inst == i
            out[mine] = getattr(r.requests, field)[mine]
        return out

    pi, di = rec.prefill_instance, rec.decode_instance
    sent = di >= 0
    d_finish = pick(rec.decode, di, "finish_s", np.nan)
    d_gen = pick(rec.decode, di, "generated_tokens", 0)
    p_gen = pick(rec.prefill, pi, "generated_tokens", 0)
    single = (pre.output_tokens <= 1) & np.isfinite(rec.delivered_s)
    finish = np.where(sent, d_finish, np.where(single, rec.delivered_s, np.nan))
    rank = np.where(sent, pick(rec.decode, di, "rank", -1), pick(rec.prefill, pi, "rank", -1))
    pre_ = [pick(rec.prefill, pi, f, 0) for f in ("preemptions", "recomputed_tokens")]
    dec_ = [pick(rec.decode, di, f, 0) for f in ("preemptions", "recomputed_tokens")]
    req = RequestRecords(
        arrival_s=pre.arrival_s,
        rank=rank.astype(np.int64),
        prompt_tokens=pre.prompt_tokens,
        output_tokens=rec.decode[0].requests.output_tokens,
        first_scheduled_s=pick(rec.prefill, pi, "first_scheduled_s", np.nan),
        first_token_s=rec.delivered_s,
        finish_s=finish,
        generated_tokens=np.where(sent, d_gen, p_gen).astype(np.int64),
        preemptions=(pre_[0] + dec_[0]).astype(np.int64),
        recomputed_tokens=(pre_[1] + dec_[1]).astype(np.int64),
        rejected=rec.rejected,
    )
    recs = rec.prefill + rec.decode
    served = ~req.rejected
    return ServingRecords(
        requests=req,
        iterations=_iterations(recs),
        dp=sum(r.dp for r in recs),
        kv_blocks_per_rank=0,
        block_tokens=rec.prefill[0].block_tokens,
        end_s=rec.end_s,
        drained=bool(np.all(np.isfinite(req.finish_s[served]))),
        sim_events=rec.sim_events,
        moe_evaluations=sum(r.moe_evaluations for r in (rec.prefill[0], rec.decode[0])),
    )


def _pool(
    s: Scenario, recs: list[ServingRecords], w: ServingWorkload, micro_batches: int
) -> dict[str, Any]:
    p = s.parallelism
    nodes = s.cluster.nodes * len(recs)  # type: ignore[union-attr]
    window = w.duration_s - w.warmup_s
    it = _iterations(recs)
    ends = it.start_s + it.duration_s
    inside = (ends >= w.warmup_s) & (ends <= w.duration_s)
    end_s = recs[0].end_s
    used = np.concatenate([r.iterations.kv_blocks_used.sum(axis=1) for r in recs])
    total_blocks = recs[0].kv_blocks_per_rank * recs[0].dp
    moe = float(it.moe_s.sum())
    ranks_iters = len(it.duration_s) * p.dp
    return {
        "instances": len(recs),
        "nodes": nodes,
        "devices": nodes * s.cluster.accelerators_per_node,  # type: ignore[union-attr]
        "layout": {"dp": p.dp, "tp": p.tp, "ep": p.ep, "a2a": p.a2a},
        "micro_batches": micro_batches,
        "scheduler": {
            "max_batch_tokens": w.scheduler.max_batch_tokens,
            "max_seqs": w.scheduler.max_seqs,
        },
        "iterations": len(it.duration_s),
        "mean_batch_tokens_per_rank": _r(float(it.batch_tokens.sum()) / ranks_iters)
        if ranks_iters
        else None,
        "mean_running_seqs_per_rank": _r(float(it.running_seqs.sum()) / ranks_iters)
        if ranks_iters
        else None,
        "busy_fraction": _r(float(it.duration_s.sum()) / (end_s * len(recs))) if end_s else None,
        "step_ms": _stats(it.duration_s, 1e3),
        "time_breakdown_s": {
            "attention": _r(float(it.attention_s.sum())),
            "moe": _r(moe),
            "moe_all_to_all": _r(float(it.moe_comm_s.sum())),
            "dense": _r(float(it.dense_s.sum())),
            "head": _r(float(it.head_s.sum())),
            "host": _r(float(it.host_s.sum())),
        },
        "all_to_all_share_of_busy": _r(float(it.moe_comm_s.sum()) / float(it.duration_s.sum()))
        if it.duration_s.sum() > 0
        else None,
        "kv_cache_blocks": total_blocks,
        "kv_cache_utilization": {
            "mean": _r(float(used.mean()) / total_blocks) if total_blocks and used.size else None,
            "max": _r(float(used.max()) / total_blocks) if total_blocks and used.size else None,
        },
        "_window": (inside, it, window, nodes),
    }


def pools_summary(system: System, rec: PoolRecords, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (the co-located summary of :func:`end_to_end`'s records) with the
    pools' KV caches and expert balance in place of the whole server's, and the ``pools``
    section: per pool and the KV transfers (see the module docstring)."""
    from moesim.derived.expert_replicas import balance_summary

    whole = ("kv_cache_blocks", "kv_cache_utilization")
    summary = {k: v for k, v in summary.items() if k not in whole}
    summary["pools"] = pools = _pools(system, rec)
    for name in POOLS:
        sub = pool_scenario(system.scenario, name)
        balance = balance_summary(sub, sub.workload.duration_s)  # type: ignore[union-attr]
        if balance is not None:
            pools[name]["experts"] = balance
    summary["devices"] = sum(pools[name]["devices"] for name in POOLS)
    summary["cluster_devices"] = system.scenario.cluster.devices
    w = system.scenario.workload
    assert isinstance(w, ServingWorkload)
    if w.slo is not None:
        nodes = sum(pools[name]["nodes"] for name in POOLS)
        pools["goodput"] = goodput(end_to_end(rec), w, nodes)
    return summary


def goodput(e2e: ServingRecords, w: ServingWorkload, nodes: int) -> dict[str, Any]:
    """Requests (and their output tokens) that arrived after the warm-up and finished
    within both SLO targets (TTFT with the KV transfer, TPOT), per second of the window
    ``[warmup_s, duration_s]``, also per node of the pools: DistServe's goodput (Zhong et
    al., OSDI 2024) at the offered load."""
    from moesim.report.serving import latencies_s, measured_mask

    assert w.slo is not None
    r = e2e.requests
    lat = latencies_s(e2e)
    done = measured_mask(e2e, w.warmup_s) & np.isfinite(r.finish_s)
    with np.errstate(invalid="ignore"):
        ok = (
            done
            & (lat["ttft"] * 1e3 <= w.slo.ttft_ms)
            & ((r.output_tokens <= 1) | (lat["tpot"] * 1e3 <= w.slo.tpot_ms))
        )
    window = w.duration_s - w.warmup_s
    tokens = float(r.output_tokens[ok].sum())
    return {
        "requests_per_s": _r(int(ok.sum()) / window),
        "tokens_per_s": _r(tokens / window),
        "tokens_per_s_per_node": _r(tokens / window / nodes),
    }


def _pools(system: System, rec: PoolRecords) -> dict[str, Any]:
    s = system.scenario
    w = s.workload
    assert isinstance(w, ServingWorkload)
    pre_req = rec.prefill[0].requests
    measured = (~rec.rejected) & (pre_req.arrival_s >= w.warmup_s)
    out: dict[str, Any] = {"route": w.pools.route if w.pools else None}
    for name, recs in (("prefill", rec.prefill), ("decode", rec.decode)):
        sub = pool_scenario(s, name)
        sub_w = sub.workload
        assert isinstance(sub_w, ServingWorkload)
        assert w.pools is not None
        summ = _pool(sub, recs, sub_w, getattr(w.pools, name).micro_batches)
        inside, it, window, nodes = summ.pop("_window")
        if name == "prefill":
            first = np.full(len(pre_req.arrival_s), np.nan)
            queue = np.full(len(pre_req.arrival_s), np.nan)
            for i, r in enumerate(recs):
                mine = rec.prefill_instance == i
                first[mine] = r.requests.first_token_s[mine]
                queue[mine] = r.requests.first_scheduled_s[mine]
            computed = float(it.prefill_tokens[inside].sum())
            done_in = (first >= w.warmup_s) & (first <= w.duration_s)
            hits = float(rec.prefix_hit_tokens[done_in].sum())
            tokens = computed + hits
            summ["input_tokens_per_s"] = _r(tokens / window)
            summ["input_tokens_per_s_per_node"] = _r(tokens / window / nodes)
            summ["computed_input_tokens_per_s_per_node"] = _r(computed / window / nodes)
            summ["prefix_cache_hit_share"] = _r(hits / tokens) if tokens else None
            summ["prefill_ttft_ms"] = _stats((first - pre_req.arrival_s)[measured], 1e3)
            summ["queue_time_ms"] = _stats((queue - pre_req.arrival_s)[measured], 1e3)
        else:
            tokens = float(it.sampled_tokens[inside].sum())
            summ["output_tokens_per_s"] = _r(tokens / window)
            summ["output_tokens_per_s_per_node"] = _r(tokens / window / nodes)
            e2e = end_to_end(rec).requests
            multi = measured & (e2e.output_tokens > 1) & np.isfinite(e2e.finish_s)
            tpot = (e2e.finish_s - e2e.first_token_s)[multi] / (e2e.output_tokens[multi] - 1)
            summ["tpot_ms"] = _stats(tpot, 1e3)
            summ["per_user_tokens_per_s"] = _stats(1.0 / tpot)
        out[name] = summ
    sent = np.isfinite(rec.transfer_s) & measured
    out["kv_transfer"] = {
        "requests": int(sent.sum()),
        "bytes_per_request": _stats(rec.transfer_bytes[sent].astype(float)),
        "ms": _stats(rec.transfer_s[sent], 1e3),
    }
    return out


def pools_energy(rec: PoolRecords) -> dict[str, Any]:
    """Energy of every instance of both pools over the whole run (devices outside the
    pools are left out), per pool and in all, per output token."""
    from moesim.energy.summary import serving_energy

    out: dict[str, Any] = {"pools": {}}
    total = 0.0
    for name, recs, sub in zip(POOLS, (rec.prefill, rec.decode), rec.systems):
        joules = sum(float(serving_energy(sub, r)["energy_j"]) for r in recs)
        out["pools"][name] = {"energy_j": float(f"{joules:.9g}")}
        total += joules
    tokens = int(end_to_end(rec).requests.generated_tokens.sum())
    out["energy_j"] = float(f"{total:.9g}")
    out["run_output_tokens"] = tokens
    out["energy_per_token_j"] = float(f"{total / tokens:.9g}") if tokens else None
    out["notes"] = ["prefill/decode pools: devices outside the pools are not counted"]
    return out
