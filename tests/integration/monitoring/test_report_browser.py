"""The HTML monitoring report opened in a real browser (Debian's headless chromium): it
loads with no console message at all (the page's Content-Security-Policy turns any
script or external load into one), its four kinds of chart are in the DOM with shapes
inside them, and its screenshot is not blank.

CI installs chromium (`.ci/run`, or `make browser` by hand): there the test must run;
elsewhere it is skipped when chromium is missing."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from modelplane.cli.report_render import report_html
from tests.unit.cli.test_report_render import CHARTS, HOSTILE, empty_report, rich_report

WINDOW = (1280, 2400)
SHAPES = {"rect", "path", "polyline", "line", "circle"}


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: CI must run the browser test (make browser)")
        pytest.skip("chromium is not installed (make browser installs it)")
    return path


def headless(
    chromium: str, profile: Path, page: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    """One headless chromium run on a fresh profile, kept off the network: nothing the
    page asks for may leave the machine, and neither may chromium's own traffic."""
    return subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # the tests run as root
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--hide-scrollbars",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def page_messages(stderr: str) -> list[str]:
    """What the page said on its console (errors, CSP violations, uncaught exceptions);
    chromium's own complaints about the machine (no D-Bus, no GPU) are not the page's."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


class ChartShapes(HTMLParser):
    """Counts the shapes inside each <svg data-chart=...> of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[tuple[str, dict[str, int]]] = []
        self._depth = 0  # inside an svg when > 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self._depth += 1
            if self._depth == 1:
                self.charts.append((dict(attrs).get("data-chart") or "", {}))
        elif self._depth and tag in SHAPES:
            counts = self.charts[-1][1]
            counts[tag] = counts.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._depth -= 1


def written(tmp_path: Path, html: str) -> Path:
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    return page


def test_the_report_loads_cleanly_with_its_charts(chromium, tmp_path):
    page = written(tmp_path, report_html(rich_report()))
    run = headless(chromium, tmp_path / "profile", page, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_messages(run.stderr) == []

    parser = ChartShapes()
    parser.feed(run.stdout)
    by_name: dict[str, list[dict[str, int]]] = {}
    for name, shapes in parser.charts:
        by_name.setdefault(name, []).append(shapes)
    assert set(by_name) == set(CHARTS)
    assert len(by_name["histogram"]) == 5
    for name, charts in by_name.items():
        for shapes in charts:
            assert shapes.keys() & {"rect", "path", "polyline"}, (name, shapes)
    assert all(shapes["rect"] >= 8 for shapes in by_name["histogram"])
    assert by_name["alerts-timeline"][0]["rect"] == 2
    assert by_name["drift-over-time"][0]["path"] == 5  # a line per column

    # the hostile column name is text on the page, not an element
    assert "<script" not in run.stdout
    assert HOSTILE.replace("<", "&lt;").replace(">", "&gt;") in run.stdout


def test_the_empty_report_loads_cleanly_and_says_so(chromium, tmp_path):
    page = written(tmp_path, report_html(empty_report()))
    run = headless(chromium, tmp_path / "profile", page, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_messages(run.stderr) == []
    assert "<svg" not in run.stdout
    assert "No rows in this range" in run.stdout and "No alerts in this range" in run.stdout


def png_rows(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the filtered scanlines (filter byte first) of a PNG, read with
    zlib alone: enough to tell a drawn page from a blank one without an image library."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(png):
        (size,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + size]
        assert (
            zlib.crc32(kind + body) == struct.unpack(">I", png[pos + 8 + size : pos + 12 + size])[0]
        )
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + size
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert interlace == 0
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    stride = 1 + (width * channels * depth + 7) // 8
    raw = zlib.decompress(b"".join(chunks))
    assert len(raw) == stride * height
    return width, height, [raw[i * stride : (i + 1) * stride] for i in range(height)]


def shows_something(row: bytes) -> bool:
    """A scanline that is not one flat colour. Filtered (Sub, Up, Average, Paeth), a flat
    row under a flat row is all zeros; unfiltered, all its bytes repeat one pixel."""
    filter_type, data = row[0], row[1:]
    if filter_type == 0:
        return len(set(data[i : i + 3] for i in range(0, len(data), 3))) > 1
    return any(data)


def test_the_screenshot_is_not_blank(chromium, tmp_path):
    page = written(tmp_path, report_html(rich_report()))
    shot = tmp_path / "report.png"
    run = headless(chromium, tmp_path / "profile", page, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_messages(run.stderr) == []
    png = shot.read_bytes()
    assert len(png) > 50_000  # a blank page of this size compresses to about 14 KB
    width, height, rows = png_rows(png)
    assert (width, height) == WINDOW
    drawn = sum(shows_something(row) for row in rows[1:])
    assert drawn > height // 4, f"only {drawn} of {height} rows show anything"
