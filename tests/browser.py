"""Headless Chromium for the report tests: load a page from the file system, let its scripts run,
return the DOM. Tests skip when no Chromium is installed (CI installs Debian's `chromium`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium() -> str:
    """The browser's path, or skip the test."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does)")


def dump_dom(page: Path, profile_dir: Path) -> str:
    """The page's DOM after its load handlers ran."""
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]
    return proc.stdout


def screenshot(page: Path, png: Path, profile_dir: Path, size: str = "1100,1400") -> Path:
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={size}",
                           "--hide-scrollbars", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-800:]
    return png


def check_page(page: Path, profile_dir: Path, figures: int, tables: int) -> str:
    """Every figure decoded (the page's own script marks each image) and the tables are there."""
    dom = dump_dom(page, profile_dir)
    assert f'data-figures="{figures} 0"' in dom, "a figure did not load (or the count differs)"
    assert dom.count('data-loaded="1"') == figures and 'data-loaded="0"' not in dom
    assert dom.count("<table>") == tables
    return dom
