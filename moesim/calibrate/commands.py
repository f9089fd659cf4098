"""``moesim calibrate`` and ``moesim fidelity``: measure -> fit -> profile -> predict -> compare."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from moesim.calibrate import records as rec_io
from moesim.calibrate.fidelity import compare, markdown, stats, text_table
from moesim.calibrate.fit import fit_profile, profile_yaml
from moesim.calibrate.predict import cluster_for, predict_replayed_s, scenario_for
from moesim.calibrate.records import Record, Writer
from moesim.config.profile import DeviceProfile
from moesim.report.files import write_text_atomic
from moesim.report.progress import Progress

DEFAULT_FIT_MODELS = ("olmoe-1b-7b",)
TARGETS = {"numpy": (0.15, None), "torch": (0.10, 0.25)}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _env(records: Sequence[Record]) -> Record:
    envs = rec_io.of_kind(records, "env")
    return envs[0] if envs else {}


def _backend(records: Sequence[Record]) -> str:
    env = _env(records)
    return "numpy" if env.get("backend") == "numpy" else "torch"


def _device(records: Sequence[Record]) -> str:
    env = _env(records)
    return str(env.get("name") or env.get("processor") or "unknown device")


def fit_from_records(
    records: Sequence[Record],
    source: str,
    fit_models: Sequence[str],
    extra: Sequence[Record] = (),
) -> DeviceProfile:
    """Fit a profile from measurement records (any backend)."""
    backend = _backend(records)
    cluster = cluster_for(_device(records), backend)

    def replay(r: Record, profile: DeviceProfile) -> float:
        return predict_replayed_s(scenario_for(r, profile, cluster, backend), r["counts"])

    return fit_profile(
        records,
        backend=backend,
        device=_device(records),
        source=source,
        fit_models=fit_models,
        replay=replay,
        extra_records=extra,
    )


def calibrate(
    backend: str | None,
    size: str,
    out: str | None,
    measurements: str | None,
    from_file: str | None,
    fit_models: Sequence[str],
    extra_files: Sequence[str],
    seed: int,
) -> int:
    today = datetime.now(UTC).date().isoformat()
    extra = [r for f in extra_files for r in rec_io.read(f)]
    if from_file:
        records = rec_io.read(from_file)
        env = _env(records)
        setup = ", ".join(f"{k} {env[k]}" for k in ("smi", "torch", "cuda", "numpy") if env.get(k))
        harness = (
            f"`python3 -m moesim.calibrate.torch_bench {' '.join(env['argv'])}`"
            if env.get("argv")
            else "moesim's numpy bench"
        )
        source = (
            f"{from_file}: measured {env.get('date', 'date unknown')} on "
            f"{_device(records)} ({setup}) by {harness}; fitted by "
            f"`moesim calibrate --from {from_file}` on {today}; calibration-set "
            f"layers: {', '.join(fit_models)}"
        )
    elif backend == "numpy":
        from moesim.calibrate.numpy_bench import SIZES, measure_host

        w = Writer(measurements)
        bar = Progress("calibrate")  # a bar with ETA over the timed layers on a terminal
        try:
            measure_host(w, SIZES[size], seed, bar.message)
        finally:
            bar.close()
        w.close()
        records = w.records
        source = (
            f"numpy measurements of {_device(records)} on {today}, "
            f"`moesim calibrate --backend numpy --size {size}`"
            + (f" (records: {measurements})" if measurements else "")
            + f"; calibration-set layers: {', '.join(fit_models)}"
        )
    elif backend == "torch":
        from moesim.calibrate import torch_bench

        path = measurements or "torch_measurements.jsonl"
        torch_bench.main(["--out", path])
        records = rec_io.read(path)
        source = (
            f"{path}: torch measurements of {_device(records)} on {today}, "
            f"`moesim calibrate --backend torch`; calibration-set layers: "
            f"{', '.join(fit_models)}"
        )
    else:
        raise SystemExit("moesim calibrate: give --backend numpy|torch or --from FILE.jsonl")
    profile = fit_from_records(records, source, fit_models, extra)
    header = (
        f"moesim device profile: {profile.device} ({profile.backend})\n"
        f"produced by moesim calibrate on {today}; see docs/fidelity.md"
    )
    text = profile_yaml(profile, header)
    if out:
        write_text_atomic(Path(out), text)
        _progress(f"profile written to {out}")
    else:
        print(text)
    g = profile.gemm_fit
    if g is not None:
        _progress(f"GEMM fit: median |error| {100 * g.median_abs_error:.1f}% over {g.samples}")
    if profile.layer_fit is not None:
        lf = profile.layer_fit
        _progress(
            f"layer fit: median |error| {100 * lf.median_abs_error:.1f}% over "
            f"{lf.samples} calibration layers"
        )
    return 0


def fidelity(
    backend: str | None,
    size: str,
    profile_path: str | None,
    from_file: str | None,
    exclude: Sequence[str],
    markdown_out: str | None,
    measurements: str | None,
    seed: int,
    title: str | None,
) -> int:
    from moesim.catalog import hardware

    if from_file:
        records = rec_io.read(from_file)
        backend = _backend(records)
    elif backend == "numpy":
        from moesim.calibrate.numpy_bench import SIZES, measure_env, measure_layers

        w = Writer(measurements)
        measure_env(w)
        bar = Progress("fidelity")
        try:
            measure_layers(w, SIZES[size], SIZES[size].heldout_models, seed, bar.message)
        finally:
            bar.close()
        w.close()
        records = w.records
    else:
        raise SystemExit("moesim fidelity: give --backend numpy or --from FILE.jsonl")
    cluster = cluster_for(_device(records), backend)
    if profile_path:
        import yaml

        profile = DeviceProfile.model_validate(yaml.safe_load(Path(profile_path).read_text()))
    else:
        acc = {"single-host-cpu": "cpu-host", "single-h100": "h100-sxm", "single-h200": "h200-sxm"}[
            cluster
        ]
        shipped = hardware.accelerator(acc).profile
        if shipped is None:
            raise SystemExit(f"moesim fidelity: {acc} has no shipped profile; give --profile")
        profile = shipped
    rows = compare(
        records, profile, backend=backend, cluster=cluster, exclude_models=exclude, seed=seed
    )
    print(text_table(rows))
    if markdown_out:
        head = title or f"{_device(records)} ({backend})"
        write_text_atomic(Path(markdown_out), markdown(rows, head, TARGETS[backend]))
        _progress(f"fidelity table written to {markdown_out}")
    s = stats(rows)
    return 0 if s.n else 1
