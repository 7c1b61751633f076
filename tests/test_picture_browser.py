"""The report page in a real headless browser (issue 22): it renders the picture (the cut's
red lines are on the screenshot), and the browser's DOM holds the caption that explains the
``r0:6`` / ``-:5`` boxes and each box's hover text (ops, bytes, source line). Skips where no
Chromium is installed (CI has none)."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib

import pytest
import torch
import torch.nn as nn

import ckpt_compile as cc
from ckpt_compile.diagnostics._picture import COLORS

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = cc.checkpoint(lambda t: self.l2(self.l1(t).relu()).relu(), x, use_reentrant=False)
        return self.l3(h).sin().sum()


def _browser(page, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", *flags, page.as_uri()],
        capture_output=True, text=True, timeout=180,  # a hung browser fails the test, not CI
    )


def _pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            chunks.append(data)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    step = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(b"".join(chunks)), width * step, [], bytearray(width * step)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - step] if i >= step else 0
            b, c = prev[i], prev[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, step)]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    torch.manual_seed(0)
    report = cc.explain(Two(), torch.randn(32, 64), inner="eager")
    # max_nodes=10: the graph collapses into r0:6 / -:5 boxes, the ones the caption explains.
    return cc.write_picture(report, tmp_path_factory.mktemp("page") / "report.html", max_nodes=10)


def test_the_browser_draws_the_cut(page, tmp_path):
    shot = tmp_path / "out.png"
    result = _browser(page, tmp_path, "--window-size=1200,900", f"--screenshot={shot}")
    assert shot.exists(), result.stderr[-2000:]
    width, height, pixels = _pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    red = bytes.fromhex(COLORS["saved"].lstrip("#"))
    # The saved box stripe, the cut's red line and the legend's swatch, as painted pixels.
    assert pixels.count(red) > 50
    assert sum(p == b"\xff\xff\xff" for p in pixels) < len(pixels)  # not a blank page


def test_the_browser_dom_explains_the_boxes(page, tmp_path):
    dom = _browser(page, tmp_path, "--dump-dom").stdout
    assert "Look at the red lines first" in dom
    assert "is region 0 (checkpoint region), 50 nodes" in dom
    labels = re.findall(r'class="small">((?:r\d+|-):\d+)</text>', dom)
    assert "r0:6" in labels, labels
    hovers = re.findall(r"<g><title>(.*?)</title>", dom, re.S)
    (region0,) = [h for h in hovers if h.startswith("forward, region 0: 6 nodes")]
    assert "ops: aten.t.default x2, aten.addmm.default x2, aten.relu.default x2" in region0
    assert "source: test_picture_browser.py:" in region0
    saved = [h for h in hovers if "saved for backward: 8.00 KiB" in h]
    assert saved, hovers
