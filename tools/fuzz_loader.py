"""Mutation fuzzing of the loader: mutate the shipped scenarios (and the shipped sweep) as a
careless user or an attacker would, load each mutant, and count what is not a clean,
located ScenarioError.

    python tools/fuzz_loader.py N [SEED]     # N mutants; prints the tally, exit 1 on a crash

Deterministic for a given N and SEED. A mutant is "uncaught" when loading raises anything
but ScenarioError, "unlocated" when an issue names no file, and a "hang" when one load takes
over HANG_S (measured, reported, never asserted by the test suite). `tests/test_fuzz.py`
runs a bounded number of mutants (by count, not time).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANG_S = 10.0

#: values a mutation may put in place of a scalar
NASTY = [
    "true",
    "false",
    "null",
    "~",
    ".inf",
    "-.inf",
    ".nan",
    "-0.0",
    "0",
    "-1",
    "1e308",
    "2147483648",
    "9223372036854775808",
    "1e19",
    "'x'",
    "abc",
    "[]",
    "{}",
    "[1, 2]",
    "!!int abc",
    "!!float x",
    "!!bool maybe",
    "2001-02-30",
    "2001-02-03",
    "0x7fffffff",
    "1_000_000",
    "'" + "9" * 4301 + "'",
    "9" * 4301,
    "*undefined",
    "&a [*a]",
    "!!binary AAAA",
    "!!python/object/apply:os.system ['true']",
    "'../../etc/passwd'",
    "/dev/zero",
    '"\\x00"',
    "1e-320",
    "0.1",
    "1000000",
    "16384",
    "4096",
]
#: fragments inserted as whole lines
LINES = [
    "include: ../../../../etc/passwd",
    "include: /dev/zero",
    "include: [a.yaml, a.yaml]",
    "x: &a [1,1,1,1,1,1,1,1,1,1]\ny: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "z: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nw: [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]",
    "description: " + "[" * 600 + "]" * 600,
    "description: &d [*d]",
    "<<: {name: x}",
    "? [a, b]\n: 1",
    "name: q\udcff",
    "name: q\x01",
    "--- \n---",
    "%YAML 1.1\n---",
    "\t- tab",
    "output: {dir: /dev/null}",
    "failures: {devices: []}",
    "limits: off",
]


@dataclass
class Tally:
    """What the mutants did."""

    n: int = 0
    clean_errors: int = 0
    valid: int = 0
    uncaught: Counter[str] = field(default_factory=Counter)
    unlocated: int = 0
    hangs: int = 0
    slowest_s: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.n} mutants: {self.clean_errors} located errors, {self.valid} valid, "
            f"{sum(self.uncaught.values())} uncaught, {self.unlocated} unlocated, "
            f"{self.hangs} over {HANG_S:g} s (slowest {self.slowest_s:.2f} s)"
        )


def sources() -> list[Path]:
    return sorted((ROOT / "scenarios").glob("*.yaml")) + sorted(
        (ROOT / "scenarios" / "sweeps").glob("*.yaml")
    )


def mutate(text: str, rng: random.Random) -> str:
    """One to three random edits of a YAML text, line based and byte based."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines)) if lines else 0
        if op == 0 and lines and ":" in lines[i]:  # replace a scalar value
            head, _, _ = lines[i].partition(":")
            lines[i] = f"{head}: {rng.choice(NASTY)}"
        elif op == 1:  # insert a line
            lines.insert(i, rng.choice(LINES))
        elif op == 2 and lines:  # delete a line
            del lines[i]
        elif op == 3 and lines:  # duplicate a line
            lines.insert(i, lines[i])
        elif op == 4 and lines:  # flip a character
            s = lines[i]
            if s:
                j = rng.randrange(len(s))
                lines[i] = (
                    s[:j] + chr(rng.choice([0, 1, 9, 34, 39, 58, 91, 123, 0xDCFF])) + s[j + 1 :]
                )
        elif op == 5 and lines:  # change the indentation
            lines[i] = " " * rng.choice([0, 1, 3, 8]) + lines[i].lstrip()
        elif op == 6 and lines:  # replace a number
            words = lines[i].split()
            nums = [k for k, w in enumerate(words) if w.rstrip(",}]").replace(".", "").isdigit()]
            if nums:
                k = rng.choice(nums)
                tail = words[k][len(words[k].rstrip(",}]")) :]
                words[k] = rng.choice(NASTY) + tail
                lines[i] = " ".join(words)
    return "\n".join(lines) + "\n"


def load_one(path: Path) -> None:
    """Load a scenario or a sweep file the way the CLI would."""
    from moesim.errors import ScenarioError

    text = path.read_text("utf-8", errors="replace")
    if "\nbase:" in "\n" + text and ("grid:" in text or "metrics:" in text):
        from moesim.sweep.runner import load_sweep, plan

        cfg, positions = load_sweep(path)
        base = path.parent / cfg.base
        if not base.is_file():
            raise ScenarioError([])
        plan(cfg, base, positions, str(path))
    else:
        from moesim.loader import load_scenario

        load_scenario(path)


def fuzz(n: int, seed: int = 0, tally: Tally | None = None) -> Tally:
    """Load ``n`` mutants (deterministic in ``n`` and ``seed``)."""
    from moesim.errors import ScenarioError

    rng = random.Random(seed)
    tally = tally or Tally()
    texts = [(p, p.read_text("utf-8")) for p in sources()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scenarios" / "sweeps"
        folder.mkdir(parents=True)
        for i in range(n):
            src, text = rng.choice(texts)
            target = (folder if src.parent.name == "sweeps" else folder.parent) / f"m{i}.yaml"
            if src.parent.name == "sweeps":  # the sweep's base sits beside the scenarios
                base = ROOT / "scenarios" / "mixtral-serving-dgx-h100.yaml"
                (folder.parent / base.name).write_text(base.read_text("utf-8"), "utf-8")
            target.write_bytes(mutate(text, rng).encode("utf-8", errors="surrogateescape"))
            t0 = time.perf_counter()
            tally.n += 1
            try:
                load_one(target)
                tally.valid += 1
            except ScenarioError as exc:
                tally.clean_errors += 1
                if any(not i.location.file for i in exc.issues):
                    tally.unlocated += 1
                    tally.examples.setdefault(
                        "unlocated", f"{target.read_text(errors='replace')}\n{exc}"
                    )
            except Exception as exc:
                key = f"{type(exc).__name__} at {traceback.extract_tb(exc.__traceback__)[-1].name}"
                tally.uncaught[key] += 1
                tally.examples.setdefault(key, target.read_text("utf-8", errors="replace"))
            dt = time.perf_counter() - t0
            tally.slowest_s = max(tally.slowest_s, dt)
            if dt > HANG_S:
                tally.hangs += 1
            target.unlink()
    return tally


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1000
    seed = int(argv[1]) if len(argv) > 1 else 0
    t = fuzz(n, seed)
    print(t.line())
    for key, count in t.uncaught.most_common():
        print(f"  {count} x {key}")
    for key, text in list(t.examples.items())[:5]:
        print(f"--- example {key}:\n{text[:2000]}")
    return 1 if t.uncaught or t.hangs else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
