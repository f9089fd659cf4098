"""Energy of a run: the integral of each device's power over its timeline, plus the network.

Each workload's records are turned into device-seconds per state
(:data:`moesim.energy.power.STATES`); energy is ``sum(seconds x power(state))``. What is
counted, per workload:

- ``layer``: every device of the cluster over the layer time. Expert GEMM intervals are
  compute- or memory-bound by the roofline of their grouped up-projection (the device's
  cost model: FLOPs over achievable FLOP/s against bytes over achievable bandwidth);
  shared-expert FFNs the same way; gate/permute and combine are memory-bound. The rest of
  the layer time is idle (waiting on the all-to-all counts as idle: the engine does not
  occupy the device while its flows are in flight). Network energy = link bytes x 8 x the
  link's ``energy_pj_per_bit`` where the preset has one (else 0, said in the notes).
- ``training`` (one step): per pipeline stage, its devices are busy during their forward
  and backward operations (the all-to-all and tensor-parallel parts communicating, the
  rest compute- or memory-bound by the roofline of a ``seq_len x d_model x d_model``
  product), idle for the rest of the pipeline (bubble and activation transfers);
  everyone communicates during the gradient sync and is memory-bound in the optimizer.
- ``serving``: every device is busy during each iteration (the ranks step in lock-step),
  its MoE part compute- or memory-bound by the roofline of the expert product at the
  iteration's tokens per expert, the rest by a ``tokens-per-rank x d_model x d_model``
  product; idle during the engine's host-side time (an engine preset's host cost: the
  device waits for the next step) and between iterations up to the end of the run
  (warm-up and drain included; at least ``duration_s``, the window the server is up for
  arrivals).

Besides the devices and the links (see :func:`infrastructure`):

- hosts: each host (a server's CPU side; one per node, or per ``chips_per_host`` chips of
  a torus) draws ``power_idle_w + busy_share x (power_busy_w - power_idle_w)`` for the
  whole duration, where ``busy_share`` is the fraction of device-seconds that are not idle
  (the host launches and feeds its accelerators' work); a host without ``power_busy_w``
  is left out, one without ``power_idle_w`` draws its busy power throughout;
- switches: a switch preset with a published ``power_w`` is charged pro rata of the ports
  the cluster attaches to it (``power_w / ports x attached ports``) for the whole duration
  (switches draw near-constant power whatever the traffic); presets without one are left
  out.

What is still left out is listed in :data:`moesim.energy.account.HOST_NOTE` and in each
account's notes. Pure functions of the records.
"""

from __future__ import annotations

import numpy as np

from moesim.config.serving import ServingWorkload
from moesim.config.training import TrainingWorkload
from moesim.cost.compute import Roofline
from moesim.energy.account import (
    HOST_NOTE,
    EnergyAccount,
    account_from_busy,
    compute_bound,
    infrastructure,
    network_energy_j,
)
from moesim.energy.power import State, device_power
from moesim.engine.layer_sim import LayerRecords
from moesim.engine.serving import ServingRecords
from moesim.engine.training import TrainingRecords
from moesim.system import System


def _product_state(rf: Roofline, m: float, k: int, n: int) -> State:
    b = rf.bytes_per_element
    return (
        "compute" if compute_bound(rf, 2.0 * m * k * n, b * (m * k + k * n + m * n)) else "memory"
    )


def _layer_communicating(rec: LayerRecords) -> list[tuple[int, State, float]]:
    """Seconds each device spends in the all-to-all kernels of one layer: dispatch from
    the end of its gate until it holds all its tokens, combine from the end of its experts
    until its own output is back (NCCL-style collectives occupy every participant for the
    whole exchange), minus the time it computes meanwhile (e.g. shared experts)."""
    tl = rec.timeline
    compute: dict[int, list[tuple[float, float]]] = {}
    for iv in tl.intervals:
        compute.setdefault(iv.device, []).append((iv.start_s, iv.end_s))
    out: list[tuple[int, State, float]] = []
    for d in set(tl.gate_end_s) | set(tl.expert_end_s):
        windows = []
        if d in tl.gate_end_s and d in tl.ready_s:
            windows.append((tl.gate_end_s[d], tl.ready_s[d]))
        if d in tl.expert_end_s and d in tl.rank_done_s:
            windows.append((tl.expert_end_s[d], tl.rank_done_s[d]))
        seconds = 0.0
        for a, b in windows:
            if b <= a:
                continue
            inside = sum(max(0.0, min(b, e) - max(a, st)) for st, e in compute.get(d, []))
            seconds += max(0.0, (b - a) - inside)
        if seconds > 0:
            out.append((d, "communicating", seconds))
    return out


def _moe_link_energy(system: System, link_bytes: np.ndarray | None, what: str) -> tuple[float, str]:
    """Link joules of a run's recorded MoE all-to-all bytes and the note saying so."""
    if link_bytes is None:
        return 0.0, "network: link bytes not recorded for this run; 0 J"
    joules, note = network_energy_j(system, link_bytes)
    return joules, f"{note} ({what})"


def layer_account(system: System, rec: LayerRecords) -> EnergyAccount:
    """Every device over the layer time (see the module docstring)."""
    s = system.scenario
    m = s.model
    rf = system.layer_costs.roofline
    layout = system.layout
    n_dev = len(system.topology.devices)
    loads = rec.timeline.expert_loads
    local_of = {layout.device(0, local): local for local in range(layout.stage_ranks)}
    up_n = (2 if m.activation in ("swiglu", "geglu") else 1) * (m.expert_d_ff // layout.etp)
    b = rf.bytes_per_element
    busy: list[tuple[int, State, float]] = []
    for iv in rec.timeline.intervals:
        state: State = "memory"
        if iv.name == "experts" and iv.device in loads:
            n = loads[iv.device][loads[iv.device] > 0].astype(float)
            flops = 2.0 * n.sum() * m.d_model * up_n
            nbytes = b * (n.sum() * m.d_model + len(n) * m.d_model * up_n + n.sum() * up_n)
            # grouped kernels reach these fractions of the product rates
            grouped = compute_bound(
                rf, flops / rf.grouped_compute_factor, nbytes / rf.grouped_memory_factor
            )
            state = "compute" if grouped else "memory"
        elif iv.name == "shared experts" and iv.device in local_of:
            tokens = float(rec.routing.tokens_per_rank[local_of[iv.device]])
            state = _product_state(rf, tokens, m.d_model, m.shared_d_ff * m.shared_experts)
        busy.append((iv.device, state, iv.end_s - iv.start_s))
    busy += _layer_communicating(rec)
    network_j, note = network_energy_j(system, rec.link_bytes)
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        rec.time_s,
        busy,
        network_j,
        (
            "layer: expert GEMMs compute- or memory-bound by the roofline; gate, permute and "
            "combine memory-bound; a device's all-to-all (from its gate's end until all its "
            "tokens have arrived, and from its experts' end until its combined output is "
            "back) communicating, outside its compute intervals; the rest idle",
            note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )


def training_account(system: System, w: TrainingWorkload, rec: TrainingRecords) -> EnergyAccount:
    """One training step of every device (see the module docstring)."""
    s = system.scenario
    m = s.model
    layout = system.layout
    rf = system.layer_costs.roofline
    n_dev = len(system.topology.devices)
    busy_stage = np.zeros(len(rec.stages))
    for stage, _, _, start, end in rec.ops:
        busy_stage[stage] += end - start
    work: State = _product_state(rf, w.seq_len * w.micro_batch_sequences, m.d_model, m.d_model)
    busy: list[tuple[int, State, float]] = []
    for stage, cost in enumerate(rec.stages):
        comm = min(
            w.microbatches * (cost.a2a_s + cost.tp_s + cost.gather_s), float(busy_stage[stage])
        )
        for local in range(layout.stage_ranks):
            d = layout.device(stage, local)
            busy.append((d, work, float(busy_stage[stage]) - comm))
            busy.append((d, "communicating", comm))
    for d in range(n_dev):
        busy.append((d, "communicating", rec.grad_sync_s))
        busy.append((d, "memory", rec.optimizer_s))
    network_j, link_note = _moe_link_energy(
        system,
        rec.moe_link_bytes,
        "the MoE all-to-alls' bytes; gradient all-reduces, ZeRO gathers, tensor-parallel "
        "collectives and pipeline transfers not counted",
    )
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        rec.step_s,
        busy,
        network_j,
        (
            f"training: forward/backward {work}-bound by the roofline of a "
            f"{w.seq_len * w.micro_batch_sequences} x {m.d_model} x {m.d_model} product, "
            "all-to-all, tensor-parallel and gradient sync communicating, optimizer "
            "memory-bound, pipeline bubble idle",
            link_note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )


def serving_account(
    system: System, rec: ServingRecords, window_s: float | None = None
) -> EnergyAccount:
    """Every device over the whole serving run (see the module docstring); with
    ``window_s``, over a window of that length holding ``rec``'s iterations."""
    s = system.scenario
    m = s.model
    layout = system.layout
    rf = system.layer_costs.roofline
    n_dev = len(system.topology.devices)
    it = rec.iterations
    b = rf.bytes_per_element
    tokens = it.batch_tokens.astype(float)
    # the rest of the iteration: weight products over the tokens of one DP rank
    m_rank = tokens / max(rec.dp, 1)
    k = m.d_model
    other_bound = (
        2.0 * m_rank * k * k / rf.flops_per_s >= b * (2 * m_rank * k + k * k) / rf.bytes_per_s
    )
    # the experts: tokens per expert through the (sharded) up-projection
    n_ff = (2 if m.activation in ("swiglu", "geglu") else 1) * (m.expert_d_ff // layout.etp)
    m_exp = tokens * m.top_k / m.experts
    moe_bound = (
        2.0 * m_exp * k * n_ff / rf.flops_per_s
        >= b * (m_exp * k + k * n_ff + m_exp * n_ff) / rf.bytes_per_s
    )
    moe_all = np.minimum(it.moe_s, it.duration_s)
    comm_s = np.minimum(it.moe_comm_s, moe_all)
    moe_s = moe_all - comm_s
    # the engine's host-side time leaves the devices waiting: idle, not busy
    other_s = np.maximum(it.duration_s - moe_all - it.host_s, 0.0)
    seconds: dict[State, float] = {
        "compute": float(moe_s[moe_bound].sum() + other_s[other_bound].sum()),
        "memory": float(moe_s[~moe_bound].sum() + other_s[~other_bound].sum()),
        "communicating": float(comm_s.sum()),
    }
    busy: list[tuple[int, State, float]] = [
        (d, st, v) for d in range(n_dev) for st, v in seconds.items()
    ]
    w = s.workload
    # the server is up for the arrival window at least, even if the last request ends early
    if window_s is None:
        window_s = max(rec.end_s, w.duration_s) if isinstance(w, ServingWorkload) else rec.end_s
    network_j, link_note = _moe_link_energy(
        system,
        rec.moe_link_bytes,
        "the MoE all-to-alls' expected bytes at each iteration's batch size; "
        "tensor-parallel collectives not counted",
    )
    return account_from_busy(
        device_power(s.cluster.accelerator),
        n_dev,
        window_s,
        busy,
        network_j,
        (
            "serving: each iteration compute- or memory-bound by the roofline (MoE part at "
            "its tokens per expert, the rest at its tokens per DP rank), the MoE layers' "
            "all-to-all (dispatch + combine on their critical path) communicating; idle "
            "between iterations, over the whole run (at least duration_s) including "
            "warm-up and drain",
            link_note,
            HOST_NOTE,
        ),
        infrastructure(system),
    )
