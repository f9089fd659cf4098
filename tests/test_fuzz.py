"""A bounded mutation fuzz of the loader over the shipped scenarios and sweep
(``tools/fuzz_loader.py``): bounded by the number of mutants, never by time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parent.parent / "tools" / "fuzz_loader.py"


def _fuzzer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_loader", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_loader"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_small() -> None:
    """60 mutants: every one is valid or a located ScenarioError (no other exception)."""
    t = _fuzzer().fuzz(60, seed=13)
    assert t.n == 60 and not t.uncaught and t.unlocated == 0, t.examples


@pytest.mark.slow
def test_fuzz_1000() -> None:
    """1,000 mutants: every one is valid or a located ScenarioError (no other exception)."""
    t = _fuzzer().fuzz(1000, seed=7)
    assert t.n == 1000 and not t.uncaught and t.unlocated == 0, t.examples
