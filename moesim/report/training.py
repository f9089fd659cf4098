"""The summary of a training run: step time, throughput, MFU, breakdown, memory."""

from __future__ import annotations

from typing import Any

from moesim.config.training import TrainingWorkload
from moesim.derived.model_figures import figures
from moesim.engine.training import TrainingRecords
from moesim.system import System
from moesim.units import BF16_BYTES, GIB


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


def training_summary(system: System, w: TrainingWorkload, rec: TrainingRecords) -> dict[str, Any]:
    """Pure function of the records (see README: Outputs)."""
    s = system.scenario
    m, p = s.model, s.parallelism
    acc = s.cluster.accelerator
    devices = p.dp * p.tp * p.pp
    # model FLOPs per token: forward x 3 (forward + backward), attention over seq_len keys
    flops_token = 3 * figures(m, w.seq_len).flops_per_token_forward
    peak = acc.peak_tflops.for_dtype("bf16") * 1e12
    mfu = flops_token * rec.tokens_per_step / (rec.step_s * devices * peak)
    stage0 = rec.stages[0]
    busy = w.microbatches * (stage0.fwd_s + stage0.bwd_s)
    comm_a2a = w.microbatches * stage0.a2a_s
    comm_tp = w.microbatches * stage0.tp_s
    gather = w.microbatches * stage0.gather_s
    compute = busy - comm_a2a - comm_tp - gather
    bubble = rec.pipeline_s - busy
    breakdown = {
        "compute": _ms(compute),
        "all_to_all": _ms(comm_a2a),
        "all_reduce": _ms(comm_tp + rec.grad_sync_s),
        "zero_gather": _ms(gather),
        "pipeline_bubble": _ms(bubble),
        "other": _ms(rec.optimizer_s),
    }
    mem = rec.memory
    summary: dict[str, Any] = {
        "scenario": s.name,
        "workload": "training",
        "seed": s.seed,
        "model": m.name,
        "cluster": s.cluster.name,
        "devices": devices,
        "layout": {"dp": p.dp, "tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp},
        "schedule": w.schedule,
        "steps": w.steps,
        "step_time_ms": _ms(rec.step_s),
        "total_time_s": round(rec.step_s * w.steps, 6),
        "tokens_per_step": rec.tokens_per_step,
        "tokens_per_s": round(rec.tokens_per_step / rec.step_s, 3),
        "mfu": round(mfu, 6),
        "breakdown_ms": breakdown,
        "bubble_fraction": round(bubble / rec.pipeline_s, 6) if rec.pipeline_s else 0.0,
        "memory_gib": mem.as_gib(),
        "memory_fits": mem.fits,
        "dropped_fraction": round(rec.dropped_fraction, 9),
        "stage_ms": [
            {"forward": _ms(st.fwd_s), "backward": _ms(st.bwd_s), "p2p": _ms(st.p2p_s)}
            for st in rec.stages
        ],
        "events": {"pipeline": rec.sim_events, "layer_evaluations": rec.layer_evaluations},
    }
    if s.policies.offload.optimizer:
        summary["offload"] = optimizer_offload_summary(system, w, rec)
    return summary


def _stream_summary(system: System, rec: TrainingRecords) -> dict[str, Any]:
    """Expert streaming per micro-batch pass (its excess over the pass's own time is
    inside the breakdown's ``compute``)."""
    st = rec.expert_stream
    if st is None:
        return {}
    passes = [x for stage in rec.stages for x in (stage.fwd_s, stage.bwd_s)]
    return {
        "streamed_experts_per_pass": st.streamed_experts,
        "expert_copy_ms_per_pass": _ms(st.copy_s),
        "copy_bound_passes": sum(1 for x in passes if x <= st.copy_s),
    }


def optimizer_offload_summary(
    system: System, w: TrainingWorkload, rec: TrainingRecords
) -> dict[str, Any]:
    """ZeRO-Offload's part of the step (its total is the breakdown's ``other``)."""
    host = rec.memory.offloaded_optimizer
    params = host / w.state_bytes if w.state_bytes else 0.0
    o = rec.optimizer_offload
    assert o is not None  # the summary asks for this section only with optimizer offload
    return {
        "optimizer_on_host_gib": round(host / GIB, 3),
        "grad_d2h_ms": _ms(o.grad_d2h_s),
        "cpu_step_ms": _ms(o.cpu_step_s),
        "param_h2d_ms": _ms(o.param_h2d_s),
        "bytes_over_host_link_gib": round(2 * BF16_BYTES * params / GIB, 3),
        **_stream_summary(system, rec),
    }


def memory_problem(summary: dict[str, Any]) -> str | None:
    """A readable sentence when the layout does not fit in device memory, else None."""
    if summary["memory_fits"]:
        return None
    g = summary["memory_gib"]
    parts = ", ".join(
        f"{k} {g[k]:.2f}"
        for k in ("weights", "gradients", "optimizer", "activations", "comm_buffers")
    )
    return (
        f"does not fit: a pipeline-stage-0 device needs {g['total']:.2f} GiB ({parts}) "
        f"but has {g['capacity']:.2f} GiB"
    )


def training_table(summary: dict[str, Any]) -> str:
    """A compact text table for the terminal."""
    s = summary
    b = s["breakdown_ms"]
    g = s["memory_gib"]
    rows = [
        ("scenario", f"{s['scenario']}  (seed {s['seed']})"),
        ("model / cluster", f"{s['model']} on {s['cluster']} ({s['devices']} devices)"),
        (
            "layout",
            " ".join(f"{k}={v}" for k, v in s["layout"].items()) + f"  schedule {s['schedule']}",
        ),
        ("step time", f"{s['step_time_ms']:.3f} ms"),
        ("  breakdown", "  ".join(f"{k} {v:.3f}" for k, v in b.items()) + "  (ms)"),
        ("throughput", f"{s['tokens_per_s']:.1f} tokens/s  MFU {100 * s['mfu']:.1f}%"),
        ("bubble", f"{100 * s['bubble_fraction']:.1f}% of the pipeline phase"),
        (
            "memory / device",
            f"{g['total']:.2f} of {g['capacity']:.2f} GiB  (weights "
            f"{g['weights']:.2f}, grads {g['gradients']:.2f}, optimizer "
            f"{g['optimizer']:.2f}, activations {g['activations']:.2f})",
        ),
        ("dropped", f"{100 * s['dropped_fraction']:.2f}% of expert slots"),
    ]
    if s.get("offload") is not None:
        o = s["offload"]
        rows.append(
            (
                "ZeRO-Offload",
                f"{o['optimizer_on_host_gib']:.2f} GiB of optimizer state on the host; "
                f"gradients out {o['grad_d2h_ms']:.1f} + CPU Adam {o['cpu_step_ms']:.1f} + "
                f"weights in {o['param_h2d_ms']:.1f} ms",
            )
        )
        if "streamed_experts_per_pass" in o:
            rows.append(
                (
                    "  experts",
                    f"{o['streamed_experts_per_pass']} streamed per pass in "
                    f"{o['expert_copy_ms_per_pass']:.1f} ms; {o['copy_bound_passes']} of "
                    f"{2 * len(s['stage_ms'])} stage passes copy-bound",
                )
            )
    problem = memory_problem(s)
    if problem:
        rows.append(("WARNING", problem))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
