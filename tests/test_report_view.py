"""The run report as a reader sees it: report.html parsed by a WHATWG-conformant HTML
parser (html5lib, strict: any markup a browser would have to repair fails), every
embedded plot decoded by an image library (Pillow) as an image viewer would, and in each
decoded picture the pixels where the plot's title and axis labels were drawn hold that
text (inside the picture, legible size, ink that disappears when the text is hidden).

Where a headless Chromium is installed (Debian's ``chromium-headless-shell`` or
``chromium``; none ships on PyPI without downloading a browser at run time) the page is
also rendered by it: every image decoded by the browser at its full size and non-blank,
the verdict laid out above the plots, the stylesheet applied; its screenshot is decoded
too. The test skips cleanly where no such browser is installed.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest
from test_report_document import REPORT_CASES, SCENARIOS

from moesim.api import run
from moesim.loader import load_scenario
from moesim.report import document

Image = pytest.importorskip("PIL.Image", reason="Pillow (matplotlib's image decoder) absent")
ImageChops = pytest.importorskip("PIL.ImageChops")

CASES = [(file, overrides) for file, overrides, _ in REPORT_CASES]
XHTML = "{http://www.w3.org/1999/xhtml}"


class _Recording(document._Plots):
    """The report's plot collector, keeping every figure as it was saved."""

    figures: ClassVar[list[tuple[str, Any]]] = []

    def add(self, name: str, title: str, draw: Any) -> None:
        def keep(fig: Any) -> None:
            draw(fig)
            _Recording.figures.append((name, fig))

        super().add(name, title, keep)


@functools.cache
def _run(file: str, overrides: tuple[str, ...]) -> Any:
    """One simulation per case, shared by the tests here (a report is written from it)."""
    return run(load_scenario(SCENARIOS / file, list(overrides)))


def _write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, overrides: list[str]):
    _Recording.figures = []
    monkeypatch.setattr(document, "_Plots", _Recording)
    result = _run(file, tuple(overrides))
    result.write_report(tmp_path)
    return result, list(_Recording.figures)


def _texts(fig: Any) -> list[tuple[str, Any]]:
    """(what, text artist) for each axis' title and axis labels."""
    out = []
    for i, ax in enumerate(fig.axes):
        for what, artist in (
            ("title", ax.title),
            ("x label", ax.xaxis.label),
            ("y label", ax.yaxis.label),
        ):
            out.append((f"axes {i} {what}", artist))
    return out


def _decode(png: bytes) -> Any:
    """The PNG as an image viewer opens it: integrity checked, then decoded to RGB."""
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    img.verify()  # checksums and structure; the object is unusable afterwards
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGB")


def _dark(img: Any, box: tuple[int, int, int, int]) -> int:
    """Pixels in ``box`` dark enough to be text ink on the white background."""
    hist = img.crop(box).convert("L").histogram()
    return sum(hist[:128])


def _parse_html(text: str) -> Any:
    html5lib = pytest.importorskip("html5lib")
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=True)
    return parser.parse(text)  # raises ParseError at the first markup a browser repairs


def _elements(root: Any, tag: str) -> list[Any]:
    return list(root.iter(XHTML + tag))


def _text(el: Any) -> str:
    return "".join(el.itertext()).strip()


@pytest.mark.parametrize(("file", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_report_page_and_every_plot_as_a_reader_sees_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, overrides: list[str]
) -> None:
    result, figures = _write(tmp_path, monkeypatch, file, overrides)
    assert figures
    root = _parse_html((tmp_path / "report.html").read_text())
    (title,) = _elements(root, "title")
    assert result.scenario.name in _text(title)
    body = next(iter(_elements(root, "body")))
    order = [
        el.get("id") or el.tag.removeprefix(XHTML)
        for el in body.iter()
        if el.get("id") == "verdict" or el.tag == XHTML + "img"
    ]
    assert order[0] == "verdict" and set(order[1:]) == {"img"}, order
    (verdict,) = [el for el in body.iter() if el.get("id") == "verdict"]
    assert _text(verdict)
    images = _elements(root, "img")
    captions = [_text(c) for c in _elements(root, "figcaption")]
    # one image per plot drawn, in order, each the same PNG as plots/<name>.png
    assert len(images) == len(figures) == len(captions)
    for img_el, caption, (name, fig) in zip(images, captions, figures):
        src = img_el.get("src")
        assert src.startswith("data:image/png;base64,"), name
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png == (tmp_path / "plots" / f"{name}.png").read_bytes(), name
        assert img_el.get("alt") == caption and caption, name
        # the page names the plot as the picture's own title does
        assert caption in [ax.get_title() for ax in fig.axes], (name, caption)
        _check_picture(name, fig, png, document.DPI)


def _check_picture(name: str, fig: Any, png: bytes, dpi: float) -> None:
    """The PNG of ``fig`` saved at ``dpi`` decodes to a picture of the figure's size, not
    blank, with each axis' title and axis labels inside it, legible, and inked by the text
    itself (the same place is lighter with the text hidden)."""
    picture = _decode(png)
    fig.set_dpi(dpi)  # lay it out again as it was saved: extents are then pixels
    fig.canvas.draw()
    width, height = (round(x) for x in fig.get_size_inches() * dpi)
    assert picture.size == (width, height), name
    lo, hi = picture.convert("L").getextrema()
    assert hi - lo > 100, f"{name}: a blank picture"
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    boxes = {}
    for what, artist in texts:
        assert artist.get_text().strip(), f"{name}: {what} is empty"
        assert artist.get_visible(), f"{name}: {what} is hidden"
        b = artist.get_window_extent(renderer)
        # inside the picture, not clipped at an edge (pixel rows count from the top)
        assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= width and b.y1 <= height, (name, what, b)
        assert min(b.width, b.height) >= 8, f"{name}: {what} is too small to read"
        boxes[what] = (int(b.x0), int(height - b.y1), int(b.x1) + 1, int(height - b.y0) + 1)
        assert _dark(picture, boxes[what]) >= 20, f"{name}: no ink where the {what} is"
    for i, ax in enumerate(fig.axes):
        for axis in (ax.xaxis, ax.yaxis):
            _no_overlapping_tick_labels(f"{name} axes {i} {axis.axis_name}", axis, renderer)
    for _, artist in texts:
        artist.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    bare = _decode(buf.getvalue())
    for what, box in boxes.items():
        # the ink in that place is the text's own, not a line or bar drawn under it
        assert _dark(picture, box) - _dark(bare, box) >= 20, f"{name}: {what}"
    for _, artist in texts:
        artist.set_visible(True)


def _no_overlapping_tick_labels(where: str, axis: Any, renderer: Any) -> None:
    """The tick labels drawn on ``axis`` (major and minor) can each be read: no two
    overlap."""
    labels = [
        t
        for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
        if t.get_visible() and t.get_text().strip()
    ]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    lo, hi = sorted(axis.get_view_interval())
    boxes = [
        (text, b)
        for (text, b), t in zip(boxes, labels)
        if lo <= axis.convert_units(t.get_position()[0 if axis.axis_name == "x" else 1]) <= hi
    ]
    for k, (a, ba) in enumerate(boxes):
        for b, bb in boxes[k + 1 :]:
            assert not ba.overlaps(bb), f"{where}: tick labels {a!r} and {b!r} overlap"


def test_sweep_pareto_plot_as_a_reader_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's front plot (pareto.png) passes the same picture checks."""
    from matplotlib.figure import Figure
    from test_sweep import _files

    from moesim.cli import main

    saved: list[tuple[Any, Any]] = []
    savefig = Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> Any:
        saved.append((fig, kwargs.get("dpi")))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    assert main(["sweep", str(_files(tmp_path)), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    monkeypatch.undo()
    (fig, dpi), *_ = saved
    png = (tmp_path / "out" / "sweeps" / "tiny-sweep" / "pareto.png").read_bytes()
    _check_picture("pareto", fig, png, float(dpi))


_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")

#: run in the page once it has loaded: what the browser made of it, written into the page
_PROBE = """<script>
window.addEventListener("load", () => {
  const out = {images: [], title: document.title};
  for (const img of document.images) {
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext("2d");
    g.drawImage(img, 0, 0);
    const px = g.getImageData(0, 0, c.width, c.height).data;
    let lo = 255, hi = 0;
    for (let i = 0; i < px.length; i += 4) { lo = Math.min(lo, px[i]); hi = Math.max(hi, px[i]); }
    const r = img.getBoundingClientRect();
    out.images.push({complete: img.complete, width: img.naturalWidth,
      height: img.naturalHeight, shown: [r.width, r.height], top: r.top, left: r.left,
      red: [lo, hi]});
  }
  const v = document.getElementById("verdict");
  const r = v.getBoundingClientRect();
  out.verdict = {top: r.top, height: r.height, text: v.textContent,
    background: getComputedStyle(v).backgroundColor};
  const pre = document.createElement("pre");
  pre.id = "moesim-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
</body>"""


def _browser() -> str | None:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed")
@pytest.mark.parametrize(("file", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_report_in_a_headless_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, overrides: list[str]
) -> None:
    browser = _browser()
    assert browser is not None
    result, figures = _write(tmp_path, monkeypatch, file, overrides)
    page = (tmp_path / "report.html").read_text()
    assert page.count("</body>") == 1
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", _PROBE))
    window = "--window-size=1200,1600"
    done = _headless(browser, window, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(_probe(done.stdout))
    assert result.scenario.name in seen["title"]
    assert len(seen["images"]) == len(figures)
    for img, (name, fig) in zip(seen["images"], figures):
        width, height = (round(x) for x in fig.get_size_inches() * document.DPI)
        assert img["complete"] and (img["width"], img["height"]) == (width, height), name
        assert min(img["shown"]) > 50, f"{name}: laid out {img['shown']}"
        lo, hi = img["red"]
        assert hi - lo > 100, f"{name}: the browser decoded a blank picture"
        assert img["top"] > seen["verdict"]["top"], name
    v = seen["verdict"]
    assert v["height"] > 10 and v["text"].strip()
    # the page's stylesheet applied: the verdict box is green (met) or red (missed)
    assert v["background"] in ("rgb(230, 244, 234)", "rgb(252, 232, 230)"), v
    # and a screenshot of the page, as the browser painted it, opened by an image viewer
    shot = tmp_path / "page.png"
    done = _headless(browser, window, f"--screenshot={shot}", probed.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    picture = _decode(shot.read_bytes())
    assert picture.size == (1200, 1600)
    colours = {c for _, c in picture.getcolors(1200 * 1600) or []}
    background = (230, 244, 234) if "rgb(230" in v["background"] else (252, 232, 230)
    assert background in colours, "the verdict box is not on the page"
    assert len(colours) > 50, "a blank page"
    # the first plot painted where the layout put it, pixel for pixel as its PNG decodes
    first = seen["images"][0]
    assert first["top"] + first["height"] <= 1600, "the first plot is below the fold"
    x, y = round(first["left"]), round(first["top"])
    painted = picture.crop((x, y, x + first["width"], y + first["height"]))
    png = (tmp_path / "plots" / f"{figures[0][0]}.png").read_bytes()
    diff = ImageChops.difference(painted, _decode(png)).convert("L")
    assert sum(diff.histogram()[16:]) < 0.01 * first["width"] * first["height"], figures[0][0]


def _probe(dom: str) -> str:
    """The probe's JSON from the DOM the browser dumped."""
    html5lib = pytest.importorskip("html5lib")
    root = html5lib.parse(dom)
    (pre,) = [el for el in root.iter() if el.get("id") == "moesim-probe"]
    return _text(pre)
