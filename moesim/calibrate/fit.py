"""Fit a DeviceProfile to measurements: the GEMM model by least squares on log time, the
memory bandwidth and call overhead directly, grouped-kernel tiling by a small grid search,
and the layer's fixed costs (a launch pipeline on GPUs, a per-layer glue time on CPUs) on
measured layers of the calibration set (whose shapes are then excluded from the fidelity
report)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moesim.calibrate.launch_fit import fit_launch
from moesim.calibrate.records import Record, measured_s, of_kind
from moesim.config.profile import CollectiveFit, DeviceProfile, FitQuality, GemmFit
from moesim.units import BYTES_PER_ELEMENT

BYTES = BYTES_PER_ELEMENT
TILES = (1, 2, 4, 8, 16, 32, 64, 128)


def quality(pred: np.ndarray, meas: np.ndarray) -> FitQuality:
    err = np.abs(np.asarray(pred) / np.asarray(meas) - 1.0)
    return FitQuality(
        samples=int(err.size),
        median_abs_error=round(float(np.median(err)), 4),
        worst_abs_error=round(float(err.max()), 4),
    )


def _gemm_pred(
    theta: np.ndarray, m: np.ndarray, k: np.ndarray, n: np.ndarray, b: int, tile: int
) -> np.ndarray:
    f, bw, c, p = np.exp(theta[0]), np.exp(theta[1]), np.exp(theta[2]), 1.0 + np.exp(theta[3])
    tc = 2.0 * (np.ceil(m / tile) * tile) * k * n / f
    tm = b * (m * k + k * n + m * n) / bw
    hi = np.maximum(tc, tm)
    return np.asarray(c + hi * ((tc / hi) ** p + (tm / hi) ** p) ** (1.0 / p))


def fit_gemm(
    records: Sequence[Record], bandwidth_ceiling: float | None = None
) -> tuple[GemmFit, FitQuality]:
    """Least squares on log time of ``overhead + p-norm(compute, memory)``.

    ``bandwidth_ceiling`` (the measured copy bandwidth) bounds the streaming rate: small
    operands that stay in cache must not teach the model a bandwidth memory cannot give.
    """
    from scipy.optimize import least_squares

    g = of_kind(records, "gemm")
    if len(g) < 4:
        raise ValueError("need at least 4 gemm measurements to fit")
    m, k, n = (np.array([r[x] for r in g], dtype=float) for x in ("M", "K", "N"))
    t = np.array([r["ms"] for r in g]) * 1e-3
    b = BYTES[g[0]["dtype"]]
    bw0 = (b * (m * k + k * n + m * n) / t).max()
    hi = np.full(4, np.inf)
    if bandwidth_ceiling is not None:
        bw0 = min(bw0, 0.9 * bandwidth_ceiling)
        hi[1] = np.log(bandwidth_ceiling)
    x0 = np.log([(2 * m * k * n / t).max(), bw0, t.min() / 4, 1.0])
    best = None
    for tile in TILES:  # rows are computed in blocks: small M pays for a whole block
        res = least_squares(
            lambda th, tile=tile: np.log(_gemm_pred(th, m, k, n, b, tile)) - np.log(t),
            x0,
            method="trf",
            bounds=(np.full(4, -np.inf), hi),
        )
        if best is None or res.cost < best[0].cost:
            best = (res, tile)
    if best is None:  # pragma: no cover - TILES is not empty
        raise ValueError("no tile candidate")
    th, tile = best[0].x, best[1]
    fit = GemmFit(
        flops_per_s=float(np.exp(th[0])),
        bytes_per_s=float(np.exp(th[1])),
        overhead_us=float(np.exp(th[2]) * 1e6),
        smoothness=float(1 + np.exp(th[3])),
        m_tile=tile,
        grouped_m_tile=tile,
    )
    return fit, quality(_gemm_pred(th, m, k, n, b, tile), t)


def fit_grouped(records: Sequence[Record], gemm: GemmFit, b: int) -> GemmFit:
    """Row tile and compute / memory efficiency of grouped GEMM kernels, relative to plain
    products: least squares on log time for each candidate tile; the best tile wins."""
    from scipy.optimize import least_squares

    from moesim.cost.compute import Roofline

    recs = [
        r
        for r in of_kind(records, "grouped_gemm")
        if r.get("impl") == "grouped_mm" and any(r["counts"])
    ]
    if len(recs) < 3:
        return gemm
    meas = np.array([r["ms"] for r in recs]) * 1e-3
    best: tuple[float, int, np.ndarray] | None = None
    for tile in TILES:

        def resid(th: np.ndarray, tile: int = tile) -> np.ndarray:
            rf = Roofline(
                flops_per_s=gemm.flops_per_s,
                bytes_per_s=gemm.bytes_per_s,
                overhead_s=gemm.overhead_us * 1e-6,
                bytes_per_element=b,
                memory_bytes_per_s=gemm.bytes_per_s,
                smoothness=gemm.smoothness,
                gemm_overhead_s=gemm.overhead_us * 1e-6,
                m_tile=gemm.m_tile,
                grouped_m_tile=tile,
                grouped_compute_factor=float(np.exp(th[0])),
                grouped_memory_factor=float(np.exp(th[1])),
                grouped_overhead_s=float(th[2]) * 1e-6,
                grouped_smoothness=1.0 + float(np.exp(th[3])),
            )
            pred = np.array(
                [
                    rf.grouped_product_s(
                        np.array([c for c in r["counts"] if c > 0], dtype=float), r["K"], r["N"]
                    )
                    for r in recs
                ]
            )
            return np.asarray(np.log(pred / meas))

        res = least_squares(
            resid,
            np.array([0.0, 0.0, 1.0, 0.0]),
            bounds=([-3.0, -3.0, 0.0, -5.0], [0.5, 0.5, 1e4, 5.0]),
        )
        err = float(np.median(np.abs(resid(res.x))))
        if best is None or err < best[0] - 1e-9:
            best = (err, tile, res.x)
    if best is None:  # pragma: no cover - TILES is not empty
        raise ValueError("no tile candidate")
    return gemm.model_copy(
        update={
            "grouped_m_tile": best[1],
            "grouped_compute_factor": float(np.exp(best[2][0])),
            "grouped_memory_factor": float(np.exp(best[2][1])),
            "grouped_overhead_us": float(best[2][2]),
            "grouped_smoothness": 1.0 + float(np.exp(best[2][3])),
        }
    )


def fit_routing(records: Sequence[Record]) -> dict[str, float]:
    """Per token x expert and per token x slot routing work, from routing measurements."""
    from scipy.optimize import nnls

    recs = of_kind(records, "routing")
    if len(recs) < 3:
        return {}
    t = np.array([r["ms"] for r in recs]) * 1e-3
    a = np.array([[1.0, r["tokens"] * r["experts"], r["tokens"] * r["top_k"]] for r in recs])
    coef, _ = nnls(a / t[:, None], np.ones_like(t))
    return {
        "routing_ns_per_element": float(coef[1] * 1e9),
        "routing_ns_per_slot": float(coef[2] * 1e9),
    }


def fit_parts(records: Sequence[Record], fit_models: Sequence[str]) -> dict[str, float]:
    """Gather and scatter cost per element from the calibration layers' measured stages
    (permute and combine), where the harness timed them: a line through their sizes."""
    from scipy.optimize import nnls

    layers = [
        r for r in of_kind(records, "moe_layer") if r["model"] in fit_models and r.get("ms_parts")
    ]
    out: dict[str, float] = {}
    for part, key in (("permute", "gather_ns_per_element"), ("combine", "scatter_ns_per_element")):
        rows = [
            (r["tokens"] * r["top_k"] * r["d_model"], r["ms_parts"][part] * 1e-3)
            for r in layers
            if r["ms_parts"].get(part)
        ]
        if len(rows) < 3:
            continue
        x, t = np.array(rows).T
        coef, _ = nnls(np.vstack([np.ones_like(x), x]).T / t[:, None], np.ones_like(t))
        out[key] = float(coef[1] * 1e9)
    return out


def memory_bytes_per_s(records: Sequence[Record]) -> float:
    """Streaming bandwidth (read + written) of the largest copies measured."""
    copies = of_kind(records, "copy") + of_kind(records, "d2d")
    if not copies:
        raise ValueError("no copy measurements")
    largest = max(r["bytes"] for r in copies)
    return float(np.median([r["gbps_rw"] for r in copies if r["bytes"] >= largest / 4]) * 1e9)


def elementwise(records: Sequence[Record], bytes_per_s: float, b: int) -> dict[str, Any]:
    """Per-element compute of activations, gather and scatter beyond their memory traffic
    (the median over every record of each kind)."""
    act: dict[str, list[float]] = {}
    for r in of_kind(records, "activation"):
        traffic = 2 * b * r["elements"] / bytes_per_s
        act.setdefault(r["function"], []).append(
            max(0.0, r["ms"] * 1e-3 - traffic) / r["elements"] * 1e9
        )
    out: dict[str, Any] = {
        "activation_ns_per_element": {k: float(np.median(v)) for k, v in act.items()}
    }
    for kind, moved in (("gather", 2), ("scatter", 3)):
        per = []
        for r in of_kind(records, kind):
            elems = r["rows"] * r["width"]
            traffic = moved * b * elems / bytes_per_s
            per.append(max(0.0, r["ms"] * 1e-3 - traffic) / elems * 1e9)
        if per:
            out[f"{kind}_ns_per_element"] = float(np.median(per))
    return out


def overhead_us(records: Sequence[Record]) -> float:
    launches = of_kind(records, "launch")
    if not launches:
        raise ValueError("no launch-overhead measurement")
    return float(np.median([r["us_per_kernel"] for r in launches]))


def collectives(records: Sequence[Record]) -> tuple[CollectiveFit, ...]:
    """alpha-beta fits of measured collectives (least squares on time)."""
    out = []
    for op in ("all_to_all", "all_reduce", "all_gather"):
        recs = of_kind(records, op)
        for world in sorted({r.get("world", 2) for r in recs}):
            rs = [r for r in recs if r.get("world", 2) == world]
            if len(rs) < 3:
                continue
            size = np.array([r.get("bytes_per_rank", r.get("bytes")) for r in rs], dtype=float)
            t = np.array([r["ms"] for r in rs]) * 1e-3
            a = np.vstack([np.ones_like(size), size]).T
            (alpha, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
            if inv_bw <= 0:
                raise ValueError(
                    f"{op} (world {world}): time does not grow with size; cannot fit a bandwidth"
                )
            out.append(
                CollectiveFit(
                    op=op,
                    world=int(world),
                    alpha_us=max(0.0, alpha) * 1e6,
                    bandwidth_gbps=1.0 / max(inv_bw, 1e-15) / 1e9,
                )
            )
    return tuple(out)


def fit_profile(
    records: Sequence[Record],
    *,
    backend: str,
    device: str,
    source: str,
    fit_models: Sequence[str],
    replay: Callable[[Record, DeviceProfile], float],
    extra_records: Sequence[Record] = (),
) -> DeviceProfile:
    """The whole profile: primitives first, then the layer's fixed costs on the fit
    models' layers.

    ``replay(record, profile)`` predicts a measured layer with the given profile from its
    measured counts. GPU layers with CUDA-graph replays fit a launch pipeline
    (:func:`moesim.calibrate.launch_fit.fit_launch`: per-kernel device time, host issue,
    the loop's host read); others (numpy) one fixed glue time per layer: the median of
    what the primitives leave unexplained in the calibration layers with the fewest
    tokens, where the fixed cost dominates.
    """

    dtype = of_kind(records, "gemm")[0]["dtype"]
    mem = memory_bytes_per_s(records)
    dtypes = {r["dtype"] for r in of_kind(records, "gemm")}
    if len(dtypes) > 1:
        raise ValueError(f"gemm measurements mix datatypes {sorted(dtypes)}; fit one at a time")
    gemm, gq = fit_gemm(records, bandwidth_ceiling=mem)
    gemm = fit_grouped(records, gemm, BYTES[dtype])
    per_element = elementwise(records, mem, BYTES[dtype])
    per_element.update(fit_parts(records, fit_models))
    base = DeviceProfile(
        device=device,
        backend=backend,
        dtype=dtype,
        source=source,
        gemm=gemm,
        memory_bytes_per_s=mem,
        kernel_overhead_us=overhead_us(records),
        collectives=collectives([*records, *extra_records]),
        gemm_fit=gq,
        **per_element,
        **fit_routing(records),
    )
    layers = [r for r in of_kind(records, "moe_layer") if r["model"] in fit_models]
    fitted = base
    if any(r.get("ms_graph") for r in layers):
        # GPU layers, eager and replayed as CUDA graphs: the layer as a launch pipeline
        fitted = fit_launch(records, fitted, layers, replay, BYTES[dtype])
    for mode, key, quality_key in (
        ("eager", "layer_overhead_us", "layer_fit"),
        ("graph", "graph_layer_overhead_us", "graph_layer_fit"),
    ):
        recs = [
            dict(r, ms_graph=None) if mode == "eager" else r
            for r in layers
            if mode == "eager" or r.get("ms_graph")
        ]
        if not recs:
            continue
        meas = np.array([measured_s(r) for r in recs])
        if fitted.launch is None:
            probe = fitted.model_copy(update={key: 0.0})
            bare = np.array([replay(r, probe) for r in recs])
            # the glue is a fixed cost per layer: what the primitives leave unexplained
            # where the fixed cost dominates, at the fewest tokens measured
            fewest = np.array([r["tokens"] for r in recs]) <= min(r["tokens"] for r in recs) * 4
            glue = max(0.0, float(np.median((meas - bare)[fewest])))
            fitted = fitted.model_copy(update={key: glue * 1e6})
        pred = np.array([replay(r, fitted) for r in recs])
        fitted = fitted.model_copy(update={quality_key: quality(pred, meas)})
    return fitted


def profile_yaml(profile: DeviceProfile, header: str) -> str:
    """The profile as a commented YAML document."""
    import yaml

    data: dict[str, Any] = profile.model_dump(mode="json")
    body = yaml.safe_dump(data, sort_keys=False)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
