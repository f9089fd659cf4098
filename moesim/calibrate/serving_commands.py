"""The serving-engine verbs: ``moesim calibrate --from FILE --engine NAME`` (fit an engine
preset on ``torch_serving`` iterations) and ``moesim fidelity --serving FILE --engine E``
(replay its online runs through moesim)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from moesim.calibrate import records as rec_io
from moesim.report.files import write_text_atomic

_HARNESS = {"lean-torch": "moesim.calibrate.torch_lean_engine"}
"""The harness that wrote each engine's records (by the env record's ``engine``)."""


def _records(path: str) -> list[dict[str, Any]]:
    """The JSON-lines records of a measurement file, or a one-line error (exit 1)."""
    if not Path(path).is_file():
        raise SystemExit(f"moesim: {path}: not a measurement file (JSON lines)")
    try:
        records = rec_io.read(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"moesim: {path}: cannot read the records: {exc}") from None
    if not any(r.get("kind") == "env" for r in records):
        raise SystemExit(f"moesim: {path}: no env record (not a torch_serving file)")
    return records


def _engine_arg(engine: str) -> str | dict[str, Any]:
    """A catalog engine name, or a YAML file holding one fitted entry ``{NAME: fields}``
    (what ``calibrate --engine`` writes), as a preset override of ``ideal``."""
    path = Path(engine)
    if not path.is_file():
        return engine
    loaded = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(loaded, dict) or len(loaded) != 1:
        raise SystemExit(f"moesim: {engine}: expected one engine entry `NAME: {{fields}}`")
    ((name, fields),) = loaded.items()
    return {"preset": "ideal", **fields, "name": name}


def engine_semantics(env: dict[str, Any]) -> dict[str, Any]:
    """What a measured engine does, read from its resolved configuration (the ``env``
    record of ``torch_serving``): scheduler defaults, launch mode, expert kernel, attention
    kernel and whether host work overlaps the device's. An engine that states its own
    semantics (``torch_lean_engine``'s ``semantics``) is taken at its word."""
    if isinstance(env.get("semantics"), dict):
        stated = dict(env["semantics"])
        if (env.get("lean_config") or {}).get("graphs"):  # decode steps only (its module doc)
            stated["host"] = {**stated.get("host", {}), "graph_decode": True}
        return stated
    cb = env.get("cb_config") or {}
    graphs = cb.get("use_cuda_graph", env.get("use_cuda_graph"))
    attn = str(env.get("attn_implementation") or "")
    return {
        "version": f"transformers {env.get('transformers', '?')}",
        "scheduler": {
            "block_tokens": int(env.get("block_size") or cb.get("block_size") or 16),
            "max_batch_tokens": int(env.get("max_batch_tokens") or cb["max_batch_tokens"]),
            "max_seqs": int(env.get("max_requests_per_batch") or cb["max_requests_per_batch"]),
            "chunked_prefill": True,
            "admit_free_fraction": float(env.get("safety_margin") or 0.0),
            "requeue": "back",
        },
        "launch": "graph" if graphs and any(graphs) else "eager",
        "expert_kernel": "grouped" if env.get("experts_implementation") == "grouped_mm" else "loop",
        "attention": "fused" if "flash" in attn else "packed",
        "host": {"overlap": bool(env.get("use_async_batching"))},
        # async batching launches step k+1 before it reads step k's tokens
        "output_lag_iterations": 1 if env.get("use_async_batching") else 0,
    }


def calibrate_engine(
    from_file: str,
    name: str,
    out: str | None,
    fit_runs: list[str] | None = None,
    weight: str = "relative",
) -> int:
    """Fit an engine preset and print (or write) it as a catalog entry."""
    from moesim.calibrate.serving_fit import fit_engine, fit_table

    records = _records(from_file)
    env = next(r for r in records if r.get("kind") == "env")
    today = datetime.now(UTC).date().isoformat()
    try:
        base = engine_semantics(env)
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(
            f"moesim: {from_file}: the env record lacks the engine's configuration ({exc})"
        ) from None
    harness = _HARNESS.get(str(env.get("engine")), "moesim.calibrate.torch_serving")
    source = (
        f"{from_file}: {env.get('engine', 'engine')} measured {env.get('utc', '?')} on "
        f"{env.get('gpu')} (torch {env.get('torch')}, {base.get('version')}) "
        f"by `python3 -m {harness}`; "
        "host cost fitted by "
        f"`moesim calibrate --from {from_file} --engine {name}"
        + (f" --fit-runs {','.join(fit_runs)}" if fit_runs else "")
        + (f" --fit-weight {weight}" if weight != "relative" else "")
        + f"` on {today}"
    )
    preset, rows = fit_engine(records, source, base, fit_runs or (), weight)
    print(fit_table(rows), file=sys.stderr)
    text = yaml.safe_dump({name: preset}, sort_keys=False, width=100)
    if out:
        write_text_atomic(Path(out), text)
        print(f"engine written to {out}", file=sys.stderr)
    else:
        print(text)
    return 0


def serving_fidelity(from_file: str, engine: str, markdown: str | None, seed: int) -> int:
    """Replay the measured online runs with an engine; print (and write) the table."""
    from moesim.calibrate.serving_fidelity import keep_up_table, replay, table

    records = _records(from_file)
    if not any(r.get("kind") == "serving_request" for r in records):
        raise SystemExit(f"moesim: {from_file}: no online runs (serving_request records)")
    rows = replay(records, _engine_arg(engine), seed)
    print(table(rows))
    print("\nlast quarter of the arrivals (output rate against the offered one):")
    print(keep_up_table(rows))
    if markdown:
        text = table(rows, markdown=True) + "\n\n" + keep_up_table(rows, markdown=True)
        write_text_atomic(Path(markdown), text + "\n")
    return 0
