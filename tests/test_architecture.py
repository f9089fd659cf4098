"""The architecture contract (pyproject.toml, docs/architecture.md) covers every module and
is a real constraint: an upward import breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moesim"


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    (contract,) = config["tool"]["importlinter"]["contracts"]
    names = []
    for layer in contract["layers"]:
        names += [n.strip() for n in layer.replace("|", ":").split(":")]
    return names


def _covered(module: str, layers: list[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layers)


def test_every_module_is_in_a_layer() -> None:
    """Each moesim module (but the package root and its ``__main__``) belongs to a layer."""
    layers = _layers()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module in ("moesim", "moesim.__main__", "moesim.cost"):
            continue
        if not _covered(module, layers):
            missing.append(module)
    assert missing == []


def test_every_package_says_what_it_owns() -> None:
    """Every package ``__init__`` starts with a docstring naming what it owns."""
    bare = [
        str(init.relative_to(ROOT))
        for init in sorted(PACKAGE.rglob("__init__.py"))
        if not init.read_text("utf-8").lstrip().startswith('"""')
    ]
    assert bare == []


def test_no_module_over_500_lines_outside_the_gpu_harnesses() -> None:
    """Modules stay small; only the standalone GPU harnesses (``calibrate/torch_*``) may
    grow past 500 lines."""
    long = [
        f"{p.relative_to(ROOT)}: {n}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text("utf-8").splitlines())) > 500 and not p.name.startswith("torch_")
    ]
    assert long == []


@pytest.mark.skipif(
    shutil.which("lint-imports") is None
    and not Path(sys.executable).with_name("lint-imports").exists(),
    reason="import-linter not installed",
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract is kept as the code stands, and broken by an engine module that
    imports the report layer."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    kept = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0, kept.stdout[-2000:]
    copy = tmp_path / "tree"
    shutil.copytree(PACKAGE, copy / "moesim", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "moesim" / "engine" / "network.py"
    bad.write_text(bad.read_text("utf-8") + "\nfrom moesim.report import fields  # noqa\n")
    env = {"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)}
    broken = subprocess.run([lint], cwd=copy, capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode != 0
    assert "moesim.engine is not allowed to import moesim.report" in broken.stdout
