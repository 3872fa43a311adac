"""The report page in a real headless browser (Debian's chromium): it renders, with plots.

Marked slow; skipped with the reason when chromium is not installed
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from safepoint.report import extract
from safepoint.report_render import write_report

from .test_report import run_dir  # noqa: F401 - the module-scoped run fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_page_renders_its_plots_without_errors(run_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from PIL import Image

    page = write_report(extract(run_dir), tmp_path / "report")["html"]
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's own script counts the images that decoded once the page loaded.
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    assert 'data-plots-loaded="3"' in body.group(0)
    assert "data-error" not in body.group(0)  # no script error on the page
    assert "checkpoint-10" in dom.stdout

    shot = tmp_path / "shot.png"
    done = chromium(
        tmp_path,
        "--hide-scrollbars",
        "--window-size=1280,2200",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2200)
    colors = {c for _, c in image.getcolors(maxcolors=1 << 20)}

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(sum(abs(a - b) for a, b in zip(rgb, c, strict=True)) < 24 for c in colors)

    # The painted screenshot holds the plots' colours: train loss, stall bars, disk line.
    for hex_color in ("#2b6cb0", "#c53030", "#38a169"):
        rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        assert near(rgb), f"{hex_color} not painted"
