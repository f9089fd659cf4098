"""Run every shipped scenario and write (or compare) its summary: the before/after check of
a refactor that must not change any figure.

    python tools/golden_summaries.py write DIR     # one DIR/<scenario>.json each
    python tools/golden_summaries.py compare DIR   # exit 1 if any figure changed

Wall-clock fields are left out; every other figure must match exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moesim.api import run
from moesim.loader import load_scenario

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = {"wall_s", "sim_seconds_per_wall_second", "events_per_s"}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def summaries(only: list[str]) -> dict[str, Any]:
    out = {}
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        if only and path.stem not in only:
            continue
        out[path.stem] = _clean(run(load_scenario(path)).summary)
        print(path.stem, flush=True)
    return out


def _diff(a: Any, b: Any, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {a!r} -> {b!r}")


def main(argv: list[str]) -> int:
    verb, folder, *only = argv
    target = Path(folder)
    if verb == "write":
        target.mkdir(parents=True, exist_ok=True)
        for name, summary in summaries(only).items():
            (target / f"{name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        return 0
    found: list[str] = []
    for name, summary in summaries(only).items():
        if not (target / f"{name}.json").is_file():
            found.append(f"{name}: new scenario (no summary before)")
            continue
        before = json.loads((target / f"{name}.json").read_text())
        _diff(before, json.loads(json.dumps(summary)), name, found)
    print("\n".join(found) if found else "all summaries identical")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
