"""report.html: a self-contained page that parses, opens with the verdict, embeds every
plot as a PNG image, and lists the inputs with their sources."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
from test_report_document import SCENARIOS, SMALL_REQUESTS

from moesim.api import run
from moesim.loader import load_scenario


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.open: list[str] = []
        self.verdict = ""
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag not in ("meta", "img", "br"):
            self.open.append(tag)
        if a.get("id") == "verdict":
            self.order.append("verdict")
            self._in_verdict = True
        if tag == "img":
            self.order.append("img")
            self.images.append(a)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()
        self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._in_verdict:
            self.verdict += data


@pytest.mark.parametrize(
    ("file", "overrides", "says"),
    [
        (
            "mixtral-serving-dgx-h100.yaml",
            ["workload.duration_s=3", "workload.warmup_s=1", *SMALL_REQUESTS],
            "too few for a p99",
        ),
        ("quickstart.yaml", ["workload.tokens=2048"], "dropped by capacity"),
    ],
)
def test_html_report_renders(tmp_path: Path, file: str, overrides: list[str], says: str) -> None:
    result = run(load_scenario(SCENARIOS / file, overrides))
    result.write_report(tmp_path)
    text = (tmp_path / "report.html").read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.open == []  # every element closed, in order
    assert page.order[0] == "verdict" and "img" in page.order
    assert says in page.verdict
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(page.images) == len(pngs)
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        # an image viewer's check: the PNG decodes to a picture of some size, not blank
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0
        assert img["alt"]
    assert result.scenario.model.source.split()[0] in text
    # the Markdown report opens with the same verdict
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict: ")


def test_run_report_flag_writes_the_html(tmp_path: Path) -> None:
    from moesim.cli import main

    quick = str(SCENARIOS / "quickstart.yaml")
    assert (
        main(["run", quick, "--out", str(tmp_path), "--report", "--set", "workload.tokens=1024"])
        == 0
    )
    (run_dir,) = list((tmp_path / "quickstart").iterdir())
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
