"""The report page in a real headless browser (Debian's chromium): it renders, with plots.

One short check runs in the default suite, the screenshot of a killed-and-resumed run
under ``slow``. Without chromium both skip with the reason, except under CI
(``CI=true``), where they fail: CI installs chromium (``.ci/run``), so a missing one is
a broken machine, not a reason to pass without looking at the page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.report import extract
from safepoint.report_render import write_report

from .test_report import run_dir  # noqa: F401 - the module-scoped run fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium's path; without one a failure under CI, else a skip with the reason.

    Module-scoped and listed first, so a missing browser is reported before the run
    fixture spends time.
    """
    if CHROMIUM is None:
        missing = "chromium is not installed (apt-get update && apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{missing}; CI must run the report's browser check", pytrace=False)
        pytest.skip(missing)
    return CHROMIUM


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
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


def test_report_of_a_short_run_loads_in_chromium(browser: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 1)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    with Checkpointer(run, save_every="5", keep_last=2, total_steps=10) as ckpt:
        for step in range(1, 11):
            metrics = {"loss": 1.0 / step} | ({"eval_loss": 2.0 / step} if step % 5 == 0 else {})
            ckpt.step(step, state, metrics=metrics)
    page = write_report(extract(run), tmp_path / "report")["html"]
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    # the page's own script counts the plots that decoded, and marks a script error
    assert 'data-plots-loaded="3"' in body.group(0) and "data-error" not in body.group(0)
    assert "checkpoint-10" in dom.stdout


@pytest.mark.slow
def test_page_renders_its_plots_without_errors(
    browser: str,
    run_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
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
