"""Fit a device's training-step kernels (:class:`moesim.config.step_kernels.StepKernelFit`)
on primitive measurements of ``torch_train --sections primitives``: ``sdpa``,
``cross_entropy``, ``rmsnorm`` and ``adamw`` records. Each model is linear in its
parameters, fitted by least squares on relative error (rows divided by the measured time),
so small and large kernels weigh alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moesim.calibrate.records import Record, of_kind
from moesim.config.step_kernels import StepKernelFit
from moesim.units import BYTES_PER_ELEMENT

_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "bf16": "bf16", "fp32": "fp32"}


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of ``a x = y`` on relative error, coefficients >= 0 (a column whose
    coefficient would be negative is dropped and the rest refitted)."""
    w = 1.0 / y
    keep = list(range(a.shape[1]))
    while True:
        x, *_ = np.linalg.lstsq(a[:, keep] * w[:, None], np.ones_like(y), rcond=None)
        if (x >= 0).all() or len(keep) == 1:
            out = np.zeros(a.shape[1])
            out[keep] = np.maximum(x, 0.0)
            return out
        keep.pop(int(np.argmin(x)))


def _errors(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[float]:
    return [float(e) for e in np.abs(a @ x / y - 1.0)]


def attention_flops(r: Record) -> float:
    """Forward FLOPs of a causal attention record: QK^T and PV over the causal half."""
    return 4.0 * r["sequences"] * r["heads"] * r["seq"] ** 2 * r["head_dim"] / 2


def _attention(recs: list[Record], key: str) -> tuple[float, float, float, list[float]]:
    """(tflops, knee, overhead_us, errors) of ``t = o + F / R + F knee / (R n)``."""
    f = np.array([attention_flops(r) for r in recs])
    n = np.array([float(r["seq"]) for r in recs], dtype=float)
    if key == "fwd":
        y = np.array([r["fwd_ms"] for r in recs]) * 1e-3
    else:
        y = np.array([r["fwd_bwd_ms"] - r["fwd_ms"] for r in recs]) * 1e-3
    a = np.column_stack([np.ones_like(f), f, f / n])
    x = _nonneg_lstsq(a, y)
    inv_rate = x[1] if x[1] > 0 else x[2] / float(n.max())
    knee = x[2] / inv_rate if inv_rate > 0 else 0.0
    return 1e-12 / inv_rate, knee, x[0] * 1e6, _errors(a, x, y)


def fit_step_kernels(
    records: Sequence[Record], memory_bytes_per_s: float, source: str
) -> StepKernelFit:
    """The fitted kernels; ``memory_bytes_per_s`` is the profile's copy bandwidth (the
    rate at which loss and norm traffic is counted, so their fits are byte counts)."""
    sdpa = of_kind(records, "sdpa")
    ce = of_kind(records, "cross_entropy")
    norm = of_kind(records, "rmsnorm")
    adam = of_kind(records, "adamw")
    missing = [
        k
        for k, v in (("sdpa", sdpa), ("cross_entropy", ce), ("rmsnorm", norm), ("adamw", adam))
        if not v
    ]
    if missing:
        raise ValueError(
            "training-kernel measurements lack " + ", ".join(missing) + " records (measure "
            "them with `python3 -m moesim.calibrate.torch_train --sections primitives`)"
        )
    errors: list[float] = []
    r_f, k_f, o_f, e = _attention(sdpa, "fwd")
    errors += e
    r_b, k_b, o_b, e = _attention(sdpa, "bwd")
    errors += e
    bw = memory_bytes_per_s
    # loss: time = logits x bytes_per_logit / bandwidth (one constant each way)
    logits = np.array([float(r["tokens"] * r["vocab"]) for r in ce])
    t_f = np.array([r["fwd_ms"] for r in ce]) * 1e-3
    t_b = np.array([r["fwd_bwd_ms"] - r["fwd_ms"] for r in ce]) * 1e-3
    ce_f = _nonneg_lstsq((logits / bw)[:, None], t_f)
    ce_b = _nonneg_lstsq((logits / bw)[:, None], t_b)
    errors += _errors((logits / bw)[:, None], ce_f, t_f)
    errors += _errors((logits / bw)[:, None], ce_b, t_b)
    # norms: overhead + passes x (read + write of the input) / bandwidth
    pass_s = np.array(
        [
            2.0 * r["tokens"] * r["d_model"] * BYTES_PER_ELEMENT[_DTYPE[r["dtype"]]] / bw
            for r in norm
        ]
    )
    a = np.column_stack([np.ones_like(pass_s), pass_s])
    y_f = np.array([r["fwd_ms"] for r in norm]) * 1e-3
    y_b = np.array([r["fwd_bwd_ms"] - r["fwd_ms"] for r in norm]) * 1e-3
    nf, nb = _nonneg_lstsq(a, y_f), _nonneg_lstsq(a, y_b)
    errors += _errors(a, nf, y_f) + _errors(a, nb, y_b)
    # AdamW: params x (ns_per_param + bytes_per_param / rate)
    params = np.array([float(r["params"]) for r in adam])
    per = np.array([optimizer_bytes_per_param(_DTYPE[r["dtype"]]) for r in adam])
    a = np.column_stack([params, params * per])
    y = np.array([r["ms"] for r in adam]) * 1e-3
    opt = _nonneg_lstsq(a, y)
    errors += _errors(a, opt, y)
    casts = {}
    for direction, (src, dst) in (
        ("narrow", ("float32", "bfloat16")),
        ("widen", ("bfloat16", "float32")),
    ):
        sel = [r for r in of_kind(records, "cast") if r.get("src") == src and r.get("dst") == dst]
        if sel:
            rates = [
                r["elements"]
                * (BYTES_PER_ELEMENT[_DTYPE[src]] + BYTES_PER_ELEMENT[_DTYPE[dst]])
                / (r["ms"] * 1e-3)
                for r in sel
            ]
            casts[direction] = float(np.median(rates))
            errors += [abs(x / casts[direction] - 1.0) for x in rates]
    return StepKernelFit(
        attention_tflops=r_f,
        attention_seq_knee=k_f,
        attention_overhead_us=o_f,
        attention_bwd_tflops=r_b,
        attention_bwd_seq_knee=k_b,
        attention_bwd_overhead_us=o_b,
        cross_entropy_fwd_bytes_per_logit=float(ce_f[0] * 1.0),
        cross_entropy_bwd_bytes_per_logit=float(ce_b[0] * 1.0),
        norm_fwd_passes=max(float(nf[1]), 1e-3),
        norm_fwd_overhead_us=float(nf[0]) * 1e6,
        norm_bwd_passes=max(float(nb[1]), 1e-3),
        norm_bwd_overhead_us=float(nb[0]) * 1e6,
        optimizer_ps_per_param=float(opt[0]) * 1e12,
        optimizer_bytes_per_s=1.0 / float(opt[1]) if opt[1] > 0 else memory_bytes_per_s,
        cast_narrow_bytes_per_s=casts.get("narrow"),
        cast_widen_bytes_per_s=casts.get("widen"),
        source=source,
        fit_median_abs_error=float(np.median(errors)),
    )


def optimizer_bytes_per_param(param_dtype: str, state_bytes: int | None = None) -> int:
    """Bytes AdamW moves per parameter: read weight, gradient and both moments, write the
    weight and the moments (moments in the parameters' dtype unless ``state_bytes``,
    the optimizer state per parameter, says otherwise)."""
    b = BYTES_PER_ELEMENT[param_dtype]
    states = 2 * b if state_bytes is None else state_bytes
    return 3 * b + 2 * states
