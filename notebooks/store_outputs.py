"""Run every notebook here top to bottom and store its outputs (printed text and figures as
PNG), as Jupyter's "Run all" then "Save" would, without a kernel or nbformat:

    python notebooks/store_outputs.py            # all notebooks
    python notebooks/store_outputs.py 03-serving-under-load.ipynb

Cells run in order in one namespace from this folder (as ``tests/test_notebooks.py``
runs them); each figure a cell leaves open is stored under it and closed. Rerun it after a
change to moesim that moves a notebook's numbers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def execute(path: Path) -> dict[str, Any]:
    """The notebook at ``path`` with fresh outputs (its other fields untouched)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    nb = json.loads(path.read_text())
    namespace: dict[str, object] = {"__name__": "__main__"}
    count = 0
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            count += 1
            out = io.StringIO()
            code = compile("".join(cell["source"]), f"{path.name}[{count}]", "exec")
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            outputs: list[dict[str, Any]] = []
            if out.getvalue():
                outputs.append(
                    {"name": "stdout", "output_type": "stream", "text": _lines(out.getvalue())}
                )
            for n in plt.get_fignums():
                fig = plt.figure(n)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
                plt.close(fig)
                outputs.append(
                    {
                        "data": {
                            "image/png": base64.b64encode(buf.getvalue()).decode(),
                            "text/plain": [f"<Figure of {len(fig.axes)} axes>"],
                        },
                        "metadata": {},
                        "output_type": "display_data",
                    }
                )
            cell["outputs"] = outputs
            cell["execution_count"] = count
    finally:
        os.chdir(cwd)
    return nb


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for p in paths:
        nb = execute(p)
        p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{p.name}: outputs stored")


if __name__ == "__main__":
    main(sys.argv[1:])
