"""Per-request records of a serving run, one row per request (as vLLM's
``benchmark_serving.py --save-result`` keeps them): ``requests.csv`` in the run folder and
``requests.parquet`` too when pyarrow is installed (``pip install 'moesim[parquet]'``).

Columns: ``request`` (arrival order), ``rank`` (the data-parallel rank it went to),
``arrival_s``, ``prompt_tokens``, ``output_tokens``, ``first_scheduled_s``,
``first_token_s``, ``finish_s`` (simulated seconds; empty when it never happened),
``ttft_ms``, ``tpot_ms``, ``e2e_ms``, ``queue_ms`` (as the summary defines them),
``preemptions``, ``recomputed_tokens``, ``rejected``, ``measured`` (arrived at or after
``warmup_s`` and not rejected: the requests the summary's latencies cover).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from moesim.engine.serving import ServingRecords
from moesim.report.files import write_bytes_atomic, write_text_atomic
from moesim.report.serving import latencies_s, measured_mask


def request_columns(rec: ServingRecords, warmup_s: float) -> dict[str, np.ndarray]:
    """The per-request table as named columns (see the module)."""
    r = rec.requests
    lat = latencies_s(rec)
    return {
        "request": np.arange(len(r.arrival_s)),
        "rank": np.asarray(r.rank),
        "arrival_s": r.arrival_s,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "first_scheduled_s": r.first_scheduled_s,
        "first_token_s": r.first_token_s,
        "finish_s": r.finish_s,
        "ttft_ms": lat["ttft"] * 1e3,
        "tpot_ms": lat["tpot"] * 1e3,
        "e2e_ms": lat["e2e"] * 1e3,
        "queue_ms": lat["queue_time"] * 1e3,
        "preemptions": r.preemptions,
        "recomputed_tokens": r.recomputed_tokens,
        "rejected": r.rejected,
        "measured": measured_mask(rec, warmup_s),
    }


def _cell(v: Any) -> Any:
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    if isinstance(v, np.floating | float):
        return "" if not np.isfinite(v) else round(float(v), 6)
    return int(v)


def write_request_records(run_dir: Path, rec: ServingRecords, warmup_s: float) -> list[Path]:
    """Write ``requests.csv`` (and ``requests.parquet`` with pyarrow); returns the paths."""
    cols = request_columns(rec, warmup_s)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in zip(*cols.values()):
        w.writerow([_cell(v) for v in row])
    paths = [run_dir / "requests.csv"]
    write_text_atomic(paths[0], buf.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return paths
    table = pa.table({k: np.asarray(v) for k, v in cols.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    paths.append(run_dir / "requests.parquet")
    write_bytes_atomic(paths[1], sink.getvalue().to_pybytes())
    return paths
