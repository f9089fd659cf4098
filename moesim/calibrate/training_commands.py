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
    rows = compare(_records(measurements), profile, ("grouped", "padded"))
    if not rows:
        raise SystemExit(f"moesim: {measurements}: no train_step records of the grouped form")
    text = table(rows)
    print(text, end="")
    if markdown:
        write_text_atomic(Path(markdown), text)
    return 0
