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


def calibrate_engine(from_file: str, name: str, out: str | None) -> int:
    """Fit an engine preset and print (or write) it as a catalog entry."""
    from moesim.calibrate.serving_fit import fit_engine, fit_table

    records = rec_io.read(from_file)
    env = next((r for r in records if r.get("kind") == "env"), None)
    if env is None:
        raise SystemExit(f"moesim: {from_file}: no env record (not a torch_serving file)")
    today = datetime.now(UTC).date().isoformat()
    config = env.get("engine_config") or {}
    base: dict[str, Any] = {"version": f"transformers {env.get('transformers', '?')}"}
    for key in ("launch", "expert_kernel"):
        if env.get(key):
            base[key] = env[key]
    if isinstance(config, dict) and config.get("scheduler"):
        base["scheduler"] = config["scheduler"]
    source = (
        f"{from_file}: {env.get('engine', 'engine')} measured {env.get('date', '?')} on "
        f"{env.get('gpu')} (torch {env.get('torch')}, transformers {env.get('transformers')}) "
        f"by `python3 -m moesim.calibrate.torch_serving`; host cost fitted by "
        f"`moesim calibrate --from {from_file} --engine {name}` on {today}"
    )
    preset, rows = fit_engine(records, name, source, base)
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
    from moesim.calibrate.serving_fidelity import replay, table

    records = rec_io.read(from_file)
    rows = replay(records, _engine_arg(engine), seed)
    print(table(rows))
    if markdown:
        write_text_atomic(Path(markdown), table(rows, markdown=True) + "\n")
    return 0
