"""The HTML report in a real browser: headless Chromium loads it without errors and draws it."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

import autopart
from autopart import zoo
from autopart.report.html import render_html

pytestmark = pytest.mark.browser

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run")


def _chromium() -> str:
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install it (apt-get install -y chromium) "
                        "for the browser tests")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module", params=["gpt2 on 4 ranks", "interleaved on 512 devices"])
def report_page(request, tmp_path_factory) -> Path:
    """GPT-2 over 4 pipeline ranks; and the 48×2048 GPT-2 on 64 hosts of 8 H100s, interleaved (16 ranks ×
    3 stages, tp = 2, dp = 16: tests/test_report_truth.py's reproduction)."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    if request.param == "gpt2 on 4 ranks":
        example = zoo.gpt2(layers=4, batch=8)
        compiled = autopart.compile(example.model, "4xH100", example_inputs=example.args, pipeline_parallel=4,
                                    num_microbatches=4)
        compiled.save_html(str(path))
    else:
        from test_report_truth import big_interleaved_plan

        path.write_text(render_html(big_interleaved_plan()), encoding="utf-8")
    return path


def test_chromium_renders_the_report(report_page: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    url = report_page.resolve().as_uri()
    png = tmp_path / "report.png"
    dom_run = subprocess.Popen(
        [chromium, *_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shot_run = subprocess.Popen(
        [chromium, *_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={png}",
         "--window-size=1400,1800", "--hide-scrollbars", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dom, log = dom_run.communicate(timeout=90)
    shot_run.communicate(timeout=90)

    assert dom_run.returncode == 0, log[-2000:]
    assert dom.count("<svg") >= 3 and "Pipeline schedule" in dom and "Memory per device" in dom
    console = [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, "the page logged to the console:\n" + "\n".join(console)

    assert shot_run.returncode == 0 and png.exists()
    data = png.read_bytes()
    assert len(data) > 10_000, f"screenshot is only {len(data)} bytes"
    width, height, distinct = _png_summary(data)
    assert (width, height) == (1400, 1800)
    assert distinct > 16, "the screenshot looks like a single colour"


def _png_summary(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed scanlines) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_missing_chromium_skips_locally_and_fails_on_ci(monkeypatch) -> None:
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _chromium()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"\.ci/run must install it"):
        _chromium()
