"""The screenshot script: a PNG of a page from a real headless browser, or a clear message when there is none."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("screenshot_report", REPO / "scripts" / "screenshot_report.py")
screenshot_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshot_report)


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "index.html"
    path.write_text("<!DOCTYPE html><html><body style='background:#2da44e'><h1>report</h1></body></html>")
    return path


def test_without_a_browser_it_says_which_it_looked_for(page, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    assert screenshot_report.main([str(page), "--out", str(tmp_path / "shot.png")]) == 2
    err = capsys.readouterr().err
    assert "no headless browser found" in err and "chromium" in err
    assert not (tmp_path / "shot.png").exists()


@pytest.mark.skipif(screenshot_report.find_browser() is None, reason="no Chromium-family browser on PATH")
@pytest.mark.integration  # a headless browser
def test_screenshot_of_a_page(page, tmp_path):
    from PIL import Image

    out = tmp_path / "shots" / "shot.png"
    assert screenshot_report.main([str(page), "--out", str(out), "--width", "400", "--height", "300"]) == 0
    with Image.open(out) as image:
        assert image.size == (400, 300)
        assert image.convert("RGB").getpixel((390, 290)) == (0x2D, 0xA4, 0x4E)  # the page's background, rendered
