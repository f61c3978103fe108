"""The report's slice viewer, driven in a real browser: headless Chromium loads report.html and moves the slider."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def report(finished):
    return finished / "report.html"


def rendered(page, fragment: str) -> dict[str, str]:
    """The canvas's record of what it drew after the page loaded at ``#fragment`` (the slider moved there)."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
               "--dump-dom", f"{page.as_uri()}#{fragment}"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    canvas = re.search(r"<canvas id=\"viewer-canvas\"[^>]*>", dom)
    assert canvas, "the viewer drew no canvas"
    return dict(re.findall(r'data-(\w+)="([^"]*)"', canvas.group(0)))


def test_the_report_has_a_viewer_of_every_test_subject_and_nothing_to_fetch(report):
    page = report.read_text()
    subjects = re.findall(r"<option value='\d+'>([^<]+)</option>", page)
    assert len(subjects) == 2 and "Slice viewer: every test subject" in page
    assert not re.search(r"(src|href)=['\"]https?://", page)
    assert page.count("id='viewer-image-") == 2  # one embedded sprite per subject


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_moving_the_slider_in_chromium_changes_the_displayed_slice(report):
    page = report.read_text()
    first, second = re.findall(r"<option value='\d+'>([^<]+)</option>", page)
    low, high = rendered(report, f"subject={first}&slice=2"), rendered(report, f"subject={first}&slice=9")
    assert low["subject"] == high["subject"] == first
    assert int(low["slice"]) < int(high["slice"]) and low["checksum"] != high["checksum"]
    other = rendered(report, f"subject={second}&slice=2")
    assert other["subject"] == second and other["checksum"] != low["checksum"]
