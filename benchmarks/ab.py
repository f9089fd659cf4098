"""Compare a benchmark's CPU time on this tree against another commit, in one run.

The other commit is checked out in a temporary git worktree; the two trees' runs
alternate (A B A B ...) so that load on a shared machine hits both alike, and each run
is a fresh process whose CPU time (user + system, from the operating system) is measured.
Prints each side's median and the ratio; the benchmark's own output is shown for the last
run of each side.

    .venv/bin/python benchmarks/ab.py --rev HEAD~1 training_1t.py --quick
    .venv/bin/python benchmarks/ab.py --rev main --repeat 3 serving_mixtral.py --duration-s 600
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs a benchmark script with the given tree's moesim first on the path (an editable
# install of the working tree would otherwise win).
RUNNER = """
import runpy, sys
tree, script = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
import moesim
assert moesim.__file__.startswith(tree), moesim.__file__
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def run_once(tree: Path, script: str, args: list[str]) -> tuple[float, str]:
    """CPU seconds of one run of ``script`` against ``tree``, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tree), str(tree / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="the commit to compare against")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side")
    ap.add_argument("script", help="a benchmark in benchmarks/, e.g. training_1t.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's arguments")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), opts.rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        shared = ROOT.parent / "shared"
        if shared.exists() and not (other.parent / "shared").exists():
            os.symlink(shared, other.parent / "shared")
        try:
            cpu: dict[str, list[float]] = {"this tree": [], opts.rev: []}
            last: dict[str, str] = {}
            for _ in range(opts.repeat):
                for label, tree in (("this tree", ROOT), (opts.rev, other)):
                    seconds, output = run_once(tree, opts.script, opts.args)
                    cpu[label].append(seconds)
                    last[label] = output
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False
            )
    for label, output in last.items():
        print(f"--- {label} (last run)\n{output.rstrip()}")
    mine, theirs = statistics.median(cpu["this tree"]), statistics.median(cpu[opts.rev])
    print(f"CPU per run, this tree: {', '.join(f'{c:.2f}' for c in cpu['this tree'])} s")
    print(f"CPU per run, {opts.rev}: {', '.join(f'{c:.2f}' for c in cpu[opts.rev])} s")
    print(f"median CPU: {mine:.2f} s vs {theirs:.2f} s: ratio {mine / theirs:.3f} (< 1 is faster)")


if __name__ == "__main__":
    main()
