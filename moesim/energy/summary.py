"""The ``energy`` section of every workload's summary (see README: Outputs, Energy).

Pure: a function of the system and the engine's records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.energy.account import EnergyAccount, facility, infrastructure
from moesim.energy.workload_accounts import layer_account, serving_account, training_account
from moesim.engine.layer_sim import LayerRecords
from moesim.engine.serving import ServingRecords
from moesim.engine.training import TrainingRecords
from moesim.failures.training_run import TrainingRunRecords
from moesim.system import System


def _sig(x: float, digits: int = 9) -> float:
    """``x`` to ``digits`` significant digits (summaries stay byte-stable and readable)."""
    return float(f"{x:.{digits}g}")


def _per(total: float, n: float) -> float | None:
    return _sig(total / n) if n > 0 else None


def account_summary(account: EnergyAccount, system: System) -> dict[str, Any]:
    """Totals, breakdowns and sources of one account under the scenario's energy inputs."""
    cfg = system.scenario.energy
    fac = facility(account, cfg)
    return {
        "energy_j": _sig(fac.total_j),
        "energy_j_by_state": {st: _sig(j) for st, j in account.device_j_by_state.items()},
        "energy_j_by_component": {
            **{k: _sig(j) for k, j in account.j_by_component.items()},
            "facility_overhead": _sig(fac.overhead_j),
        },
        "device_seconds_by_state": {st: _sig(v) for st, v in account.state_s.items()},
        "duration_s": _sig(account.duration_s),
        "kwh": _sig(fac.kwh),
        "kgco2e": _sig(fac.kgco2e),
        "average_power_w": _per(fac.total_j, account.duration_s),
        "pue": cfg.pue,
        "carbon_intensity_g_per_kwh": cfg.carbon_intensity_g_per_kwh,
        "facility_source": cfg.source or "not given (pue 1 and no carbon intensity by default)",
        "power_w": {st: _sig(w) for st, w in account.power.as_dict().items()},
        "power_source": account.power.source,
        "notes": list(account.notes),
    }


def serving_energy(system: System, records: ServingRecords) -> dict[str, Any]:
    """The ``energy`` section of a serving run (the whole run: warm-up and drain too)."""
    account = serving_account(system, records)
    out = account_summary(account, system)
    total = facility(account, system.scenario.energy).total_j
    r = records.requests
    # energy covers the whole run (warm-up and drain included), so do these counts;
    # the summary's top-level counts cover the measured requests only
    out["run_output_tokens"] = int(r.generated_tokens.sum())
    out["run_completed_requests"] = int(np.isfinite(r.finish_s).sum())
    out["energy_per_token_j"] = _per(total, out["run_output_tokens"])
    out["energy_per_request_j"] = _per(total, out["run_completed_requests"])
    out.update(steady_energy(system, records))
    return out


def steady_energy(system: System, rec: ServingRecords) -> dict[str, Any]:
    """Energy per output token over the steady-state window (after the warm-up and the
    start-up ramp, before the drain: :mod:`moesim.report.steady` defines it and the
    summary's ``steady_state`` reports it): the iterations ending inside it, every device
    idle for the rest of it, the MoE all-to-all bytes in proportion to their tokens. The
    whole-run ``energy_per_token_j`` also pays the ramp and the drain's idle tail."""
    import dataclasses

    w = system.scenario.workload
    assert isinstance(w, ServingWorkload)
    r, it = rec.requests, rec.iterations
    done = (~r.rejected) & (r.arrival_s >= w.warmup_s) & np.isfinite(r.finish_s)
    ramp = float(np.percentile(r.finish_s[done] - r.arrival_s[done], 90)) if done.any() else 0.0
    start, end = max(w.warmup_s, min(ramp, w.duration_s / 2)), w.duration_s
    ends = it.start_s + it.duration_s
    inside = (ends >= start) & (ends <= end)
    tokens = int(it.sampled_tokens[inside].sum())
    if end <= start or not tokens:
        return {"steady_window_s": [start, end], "steady_energy_per_token_j": None}
    steady_it = dataclasses.replace(
        it,
        **{
            f.name: getattr(it, f.name)[inside]
            for f in dataclasses.fields(it)
            if len(getattr(it, f.name)) == len(ends)
        },
    )
    share = float(it.batch_tokens[inside].sum()) / max(float(it.batch_tokens.sum()), 1.0)
    links = None if rec.moe_link_bytes is None else rec.moe_link_bytes * share
    part = dataclasses.replace(rec, iterations=steady_it, moe_link_bytes=links)
    account = serving_account(system, part, window_s=end - start)
    total = facility(account, system.scenario.energy).total_j
    return {
        "steady_window_s": [round(start, 6), round(end, 6)],
        "steady_output_tokens": tokens,
        "steady_energy_per_token_j": _per(total, tokens),
    }


def training_energy(
    system: System,
    w: TrainingWorkload,
    records: TrainingRecords,
    training_run: TrainingRunRecords | None = None,
) -> dict[str, Any]:
    """The ``energy`` section of ``workload.steps`` training steps; with a
    ``training_run`` (``workload.duration_s``), of the whole run's wall clock."""
    step = training_account(system, w, records)
    step_j = facility(step, system.scenario.energy).total_j
    if training_run is not None:
        return _run_summary(system, step, step_j, training_run)
    account = step.scaled(w.steps)
    out = account_summary(account, system)
    out["steps"] = w.steps
    out["energy_per_step_j"] = _sig(step_j)
    out["energy_per_token_j"] = _per(step_j, records.tokens_per_step)
    return out


def layer_energy(system: System, records: LayerRecords, tokens: int) -> dict[str, Any]:
    """The ``energy`` section of one simulated layer over ``tokens`` tokens."""
    account = layer_account(system, records)
    out = account_summary(account, system)
    total = facility(account, system.scenario.energy).total_j
    out["energy_per_token_j"] = _per(total, tokens)
    return out


def _run_summary(
    system: System, step: EnergyAccount, step_j: float, run: TrainingRunRecords
) -> dict[str, Any]:
    """A training run over its wall clock: every computed step (lost ones included) as
    one step's account, every other second (checkpoint writes, detection, spare swaps,
    repairs, restarts, the unfinished tail) with the devices idle."""
    busy_s = run.computed_steps * run.step_s
    waiting_s = run.duration_s - busy_s
    account = step.scaled(run.computed_steps).plus_idle(
        waiting_s,
        infrastructure(system),
        f"training run: {run.computed_steps} steps computed ({run.lost_steps} lost to "
        f"failures), devices idle for the other {waiting_s:.6g} s (checkpoint writes, "
        "detection, swaps, repairs, restarts)",
    )
    out = account_summary(account, system)
    total = facility(account, system.scenario.energy).total_j
    out["steps"] = run.computed_steps
    out["useful_steps"] = run.useful_steps
    out["energy_per_step_j"] = _sig(step_j)
    out["energy_per_token_j"] = _per(step_j, run.tokens_per_step)
    out["energy_per_useful_step_j"] = _per(total, run.useful_steps)
    out["energy_per_useful_token_j"] = _per(total, run.useful_steps * run.tokens_per_step)
    return out


def energy_lines(summary: dict[str, Any]) -> str:
    """Three lines for the text table of a run whose summary has an ``energy`` section."""
    e = summary.get("energy")
    if not e:
        return ""
    per = e.get("energy_per_token_j")
    per_txt = ""
    if per is not None:  # mJ below 1 J a token (GPU serving), J above (offloading, CPUs)
        per_txt = f"  {per:.4g} J/token" if per >= 1 else f"  {per * 1e3:.4g} mJ/token"
    steady = e.get("steady_energy_per_token_j")
    if steady is not None:
        a, b = e["steady_window_s"]
        txt = f"{steady:.4g} J" if per is not None and per >= 1 else f"{steady * 1e3:.4g} mJ"
        per_txt += f" (whole run), {txt}/token (steady state, {a:.3g}-{b:.3g} s)"
    if e.get("energy_per_request_j") is not None:
        per_txt += f"  {e['energy_per_request_j']:.4g} J/request"
    useful = e.get("energy_per_useful_token_j")
    if useful is not None:  # a training run: failures, checkpoints and waits included
        per_txt += f"  (run: {useful * 1e3:.4g} mJ per useful token)"
    w = e["power_w"]
    basis = e["power_source"].split(";")[0]
    comp = e.get("energy_j_by_component", {})
    parts = "  ".join(f"{k} {v:.4g}" for k, v in comp.items())
    carbon = (
        f"{e['kgco2e']:.4g} kgCO2e"
        if e.get("carbon_intensity_g_per_kwh")
        else "carbon: no intensity set"
    )
    return (
        f"energy             {e['energy_j']:.6g} J  ({e['kwh']:.4g} kWh, "
        f"{carbon}, PUE {e['pue']:g})  avg {e['average_power_w'] or 0:.5g} W"
        f"{per_txt}\n"
        f"  power (W)        idle {w['idle']:g}  compute {w['compute']:g}  memory "
        f"{w['memory']:g}  communicating {w['communicating']:g}  ({basis}; see power_source)\n"
        f"  by component (J) {parts}"
    )
