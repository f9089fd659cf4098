"""The teaching notebooks run top to bottom (each ends in assertions about what it teaches),
and are stored with their outputs: every figure a cell draws is stored under it as an image.

Code cells are executed in order in one namespace, from the notebook's folder, as a
Jupyter kernel would run them; no kernel or nbformat dependency is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4


#: notebooks that simulate serving at length (30-50 s of CPU each): run by .ci/run only
SLOW = {"03-serving-under-load", "04-offloading-and-failures"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path.name} has no code"
    # stored with their outputs (python notebooks/store_outputs.py), so a reader sees the
    # plots without running anything; each cell's stored images are checked below
    stored = [sum("image/png" in o.get("data", {}) for o in c["outputs"]) for c in cells]
    monkeypatch.chdir(path.parent)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the notebooks leave the backend to Jupyter (inline there); headless here
    assert all("matplotlib.use(" not in "".join(c["source"]) for c in cells)
    namespace: dict[str, object] = {"__name__": "__main__"}
    import matplotlib.pyplot as plt

    plt.close("all")  # a fresh kernel: no figure left over from another test

    figures = 0
    for i, cell in enumerate(cells):
        code = compile("".join(cell["source"]), f"{path.name}[code cell {i + 1}]", "exec")
        exec(code, namespace)
        # what Jupyter's inline backend would show under this cell: every figure it made,
        # each axis titled and labelled
        made = plt.get_fignums()
        assert len(made) == stored[i], (
            f"{path.name} code cell {i + 1} draws {len(made)} figures but stores "
            f"{stored[i]} images: run python notebooks/store_outputs.py {path.name}"
        )
        for n in made:
            fig = plt.figure(n)
            figures += 1
            for ax in fig.axes:
                where = f"{path.name} cell {i + 1}"
                assert ax.get_title() or fig.get_suptitle(), where
                # each axis labelled, or sharing the axis of a panel that is
                for name, shared in (("x", ax.get_shared_x_axes()), ("y", ax.get_shared_y_axes())):
                    labels = [getattr(a, f"get_{name}label")() for a in shared.get_siblings(ax)]
                    assert any(labels), f"{where}: no {name} label"
            plt.close(fig)
    assert figures, f"{path.name} draws no figure"
    assert os.getcwd() == str(path.parent)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_figures_display(path: Path) -> None:
    """What a reader opening the notebook sees without running it: every stored figure is
    a display output Jupyter renders (base64 PNG beside its text form) that an image
    decoder (Pillow) opens as a picture of plot size that is not blank, in execution order."""
    import base64
    import io

    image = pytest.importorskip("PIL.Image")
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not run top to bottom"
    pictures = 0
    for i, cell in enumerate(cells):
        for out in cell["outputs"]:
            assert out["output_type"] in ("stream", "display_data", "execute_result", "error")
            assert out["output_type"] != "error", f"{path.name} cell {i + 1} stored an error"
            png = out.get("data", {}).get("image/png")
            if png is None:
                continue
            assert out["output_type"] in ("display_data", "execute_result")
            assert "text/plain" in out["data"]
            data = base64.b64decode("".join(png) if isinstance(png, list) else png, validate=True)
            with image.open(io.BytesIO(data)) as img:
                assert img.format == "PNG"
                img.verify()
            with image.open(io.BytesIO(data)) as img:
                img.load()
                width, height = img.size
                lo, hi = img.convert("L").getextrema()
            where = f"{path.name} cell {i + 1}"
            assert width >= 300 and height >= 200, (where, img.size)
            assert hi - lo > 100, f"{where}: a blank picture"
            pictures += 1
    assert pictures, f"{path.name} stores no figure"
