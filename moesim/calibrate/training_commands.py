"""The training-step verbs: ``moesim calibrate --training FILE --profile P`` (fit the
training-step kernels on ``torch_train`` primitives into profile P's ``training:``
section) and ``moesim fidelity --training FILE`` (predicted vs measured single-GPU
training steps, ``train_step`` records, none of which the fit saw)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from moesim.calibrate import records as rec_io
from moesim.calibrate.step_fit import fit_step_kernels
from moesim.report.files import write_text_atomic

PHASES = ("fwd", "fwd_bwd", "opt", "step", "peak")


def _records(path: str) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise SystemExit(f"moesim: {path}: not a measurement file (JSON lines)")
    try:
        return rec_io.read(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"moesim: {path}: cannot read the records: {exc}") from None


def calibrate_training(measurements: str, profile: str) -> int:
    """Fit the step kernels and write them into ``profile`` (atomically; the rest of the
    profile is kept as it is)."""
    records = _records(measurements)
    path = Path(profile)
    if not path.is_file():
        raise SystemExit(f"moesim: {profile}: no such device profile (write one first)")
    data = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(data, dict) or "memory_bytes_per_s" not in data:
        raise SystemExit(f"moesim: {profile}: not a device profile")
    env = next((r for r in records if r.get("kind") == "env"), {})
    source = (
        f"{measurements}: measured {env.get('date', '?')} on {env.get('name', '?')} (torch "
        f"{env.get('torch', '?')}, cuda {env.get('cuda', '?')}) by `python3 -m "
        "moesim.calibrate.torch_train --sections primitives`; fitted by `moesim calibrate "
        f"--training` on {datetime.now(UTC).date().isoformat()}"
    )
    try:
        fit = fit_step_kernels(records, float(data["memory_bytes_per_s"]), source)
    except ValueError as exc:
        raise SystemExit(f"moesim: {measurements}: {exc}") from None
    # replace (or append) only the top-level ``training:`` block: the rest stays as written
    kept, skipping = [], False
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("training:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        kept.append(line)
    block = yaml.safe_dump({"training": fit.model_dump(mode="json")}, sort_keys=False, width=88)
    write_text_atomic(path, "\n".join(kept).rstrip("\n") + "\n" + block)
    print(
        f"wrote the training kernels into {profile} (median |error| on the primitives "
        f"{100 * (fit.fit_median_abs_error or 0):.1f}%)"
    )
    return 0


def held_out_runs(records: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(set, train_step record)`` pairs: ``development`` for steps measured by a run
    whose sections did not include ``heldout``, ``held out`` for the others (the models
    and shapes looked at while building the step model versus those that were not)."""
    out = []
    held = False
    for r in records:
        if r.get("kind") == "env":
            held = "heldout" in " ".join(str(a) for a in r.get("argv", []))
        elif r.get("kind") == "train_step":
            out.append(("held out" if held else "development", r))
    return out


def step_scenario(r: dict[str, Any], profile: str | None) -> dict[str, Any]:
    """The moesim scenario of one measured single-GPU training step."""
    cluster: dict[str, Any] = {"preset": "single-h200"}
    if profile:
        cluster["profile"] = profile
    if r["form"] == "loop":
        cluster["expert_kernel"] = "loop"
    state = 4 if r["precision"] == "bf16" else 8  # torch AdamW: moments in the params' dtype
    scenario: dict[str, Any] = {
        "name": f"{r['model']}-step",
        "seed": 0,
        "cluster": cluster,
        "model": {"preset": r["model"], "layers": int(r["layers"])},
        "routing": {"kind": "uniform"},
        "parallelism": {},
        "workload": {
            "kind": "training",
            "seq_len": int(r["tokens"]) // int(r["sequences"]),
            "micro_batch_sequences": int(r["sequences"]),
            "microbatches": 1,
            "precision": r["precision"],
            "optimizer_bytes_per_param": state,
            "persistent_grads": False,  # zero_grad(set_to_none=True) between steps
        },
    }
    if r["form"] == "padded":
        scenario["policies"] = {
            "capacity_factor": float(r["capacity_factor"]),
            "expert_compute": "padded",
            "group_size": int(r["group_size"]),
            "mask_build": "eager",  # the harness builds its masks op by op
        }
    return scenario


def compare(
    records: Sequence[dict[str, Any]], profile: str | None, forms: Sequence[str] = ("grouped",)
) -> list[dict[str, Any]]:
    """One row per measured step of the expert ``forms``: measured and predicted phases
    (ms, GiB)."""
    from moesim.engine.training import simulate_training
    from moesim.loader import scenario_from_dict
    from moesim.system import build_system

    rows = []
    for group, r in held_out_runs(records):
        if r["form"] not in forms:
            continue
        s = scenario_from_dict(step_scenario(r, profile))
        sim = simulate_training(build_system(s), s.workload)  # type: ignore[arg-type]
        st = sim.stages[0]
        pred = {
            "fwd": st.fwd_s * 1e3,
            "fwd_bwd": (st.fwd_s + st.bwd_s) * 1e3,
            "opt": sim.optimizer_s * 1e3,
            "step": sim.step_s * 1e3,
            "peak": sim.memory.total / 2**30,
        }
        meas = {
            "fwd": r["fwd_ms"],
            "fwd_bwd": r["fwd_bwd_ms"],
            "opt": r["opt_ms"],
            "step": r["step_ms"],
            "peak": r["peak_bytes"] / 2**30,
        }
        if r["form"] != "grouped":
            group = f"{group}, {r['form']}"
        rows.append({"set": group, "record": r, "measured": meas, "predicted": pred})
    return rows


def dist_scenario(r: dict[str, Any], profile: str | None) -> dict[str, Any]:
    """The moesim scenario of one measured multi-GPU step (``torch_train_dist``)."""
    one = step_scenario({**r, "tokens": r["tokens_per_rank"], "form": "grouped"}, profile)
    world = int(r["world"])
    one["cluster"]["preset"] = f"h200x{world}"
    one["parallelism"] = {"dp": world} if r["layout"] == "dp" else {"dp": world, "ep": world}
    one["workload"]["grad_sync"] = r["grad_sync"]
    # DDP keeps its gradient buckets between steps; the flat variant frees the gradients
    one["workload"]["persistent_grads"] = r["grad_sync"] == "bucketed"
    if r.get("bucket_mb"):
        one["workload"]["bucket_mb"] = float(r["bucket_mb"])
    return one


def compare_dist(records: Sequence[dict[str, Any]], profile: str | None) -> list[dict[str, Any]]:
    """One row per measured multi-GPU step: measured and predicted step (ms) and peak
    memory (GiB)."""
    from moesim.engine.training import simulate_training
    from moesim.loader import scenario_from_dict
    from moesim.system import build_system

    rows = []
    for r in (r for r in records if r.get("kind") == "dist_train_step"):
        s = scenario_from_dict(dist_scenario(r, profile))
        sim = simulate_training(build_system(s), s.workload)  # type: ignore[arg-type]
        rows.append(
            {
                "record": r,
                "measured": {"step": r["step_ms"], "peak": r["peak_bytes"] / 2**30},
                "predicted": {"step": sim.step_s * 1e3, "peak": sim.memory.total / 2**30},
            }
        )
    return rows


def rankings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Data- vs expert-parallel, per (model, precision, sync, tokens): which layout is
    faster, measured and predicted."""
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        r = row["record"]
        key = (r["model"], r["layers"], r["precision"], r["grad_sync"], r["tokens_per_rank"])
        pairs.setdefault(key, {})[r["layout"]] = row
    out = []
    for key, by in sorted(pairs.items()):
        if set(by) != {"dp", "ep"}:
            continue
        meas = "ep" if by["ep"]["measured"]["step"] < by["dp"]["measured"]["step"] else "dp"
        pred = "ep" if by["ep"]["predicted"]["step"] < by["dp"]["predicted"]["step"] else "dp"
        out.append(
            {
                "key": key,
                "measured_faster": meas,
                "predicted_faster": pred,
                "measured_ep_over_dp": by["ep"]["measured"]["step"] / by["dp"]["measured"]["step"],
                "predicted_ep_over_dp": by["ep"]["predicted"]["step"]
                / by["dp"]["predicted"]["step"],
            }
        )
    return out


def dist_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | layers | precision | sync | tokens/rank | layout | step meas / pred | "
        "peak GiB meas / pred |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["record"]
        m, p = row["measured"], row["predicted"]
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['precision']} | {r['grad_sync']} | "
            f"{r['tokens_per_rank']} | {r['layout']} | {m['step']:.1f} / {p['step']:.1f} "
            f"({100 * (p['step'] / m['step'] - 1):+.0f}%) | {m['peak']:.1f} / {p['peak']:.1f} |"
        )
    ranks = rankings(rows)
    if ranks:
        right = sum(1 for k in ranks if k["measured_faster"] == k["predicted_faster"])
        lines += ["", f"DP vs EP ranking right in {right} of {len(ranks)} cases:", ""]
        lines += ["| case | faster (measured) | faster (moesim) | EP/DP meas | EP/DP pred |"]
        lines += ["|---|---|---|---|---|"]
        for k in ranks:
            lines.append(
                f"| {' '.join(map(str, k['key']))} | {k['measured_faster']} | "
                f"{k['predicted_faster']} | {k['measured_ep_over_dp']:.2f} | "
                f"{k['predicted_ep_over_dp']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _err(row: dict[str, Any], phase: str) -> float:
    return float(row["predicted"][phase] / row["measured"][phase] - 1.0)


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per set and phase: (median |error|, worst |error|)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for group in sorted({r["set"] for r in rows}):
        sel = [r for r in rows if r["set"] == group]
        out[group] = {
            p: (
                statistics.median(abs(_err(r, p)) for r in sel),
                max(abs(_err(r, p)) for r in sel),
            )
            for p in PHASES
        }
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| set | model | layers | precision | tokens | cf | " + " | ".join(
        f"{p} meas / pred" for p in PHASES
    )
    lines = [head + " |", "|" + "---|" * (6 + len(PHASES))]
    for row in rows:
        r = row["record"]
        cells = [
            f"{row['measured'][p]:.1f} / {row['predicted'][p]:.1f} ({100 * _err(row, p):+.0f}%)"
            for p in PHASES
        ]
        lines.append(
            f"| {row['set']} | {r['model']} | {r['layers']} | {r['precision']} | "
            f"{r['tokens']} | {r.get('capacity_factor') or ''} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    lines.append("| set | " + " | ".join(f"{p}: median / worst abs error" for p in PHASES) + " |")
    lines.append("|" + "---|" * (1 + len(PHASES)))
    for group, phases in summary(rows).items():
        cells = [f"{100 * m:.1f}% / {100 * w:.1f}%" for m, w in phases.values()]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def training_fidelity(measurements: str, profile: str | None, markdown: str | None) -> int:
    records = _records(measurements)
    rows = compare(records, profile, ("grouped", "padded"))
    dist_rows = compare_dist(records, profile)
    if not rows and not dist_rows:
        raise SystemExit(
            f"moesim: {measurements}: no train_step (torch_train) or dist_train_step "
            "(torch_train_dist) records"
        )
    text = (table(rows) if rows else "") + ("\n" + dist_table(dist_rows) if dist_rows else "")
    print(text, end="")
    if markdown:
        write_text_atomic(Path(markdown), text)
    return 0
