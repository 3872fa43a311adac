"""The live progress line of ``safepoint train``: fits the terminal, says what tqdm says."""

from __future__ import annotations

import pytest

from safepoint.app.progress import clock, progress_line, rate_text

FULL = dict(
    loss=1.81734,
    elapsed=12.4,
    steps_per_s=3.21,
    next_save="50",
    last_save="resumed 40",
)


@pytest.mark.parametrize("width", [80, 60, 120, 40, 20])
def test_fits_the_width_and_keeps_step_of_total(width: int) -> None:
    line = progress_line(step=45, total=200, width=width, **FULL)
    assert len(line) <= width
    assert "45/200" in line


def test_wide_terminal_shows_everything() -> None:
    line = progress_line(step=45, total=200, width=120, **FULL)
    assert line.startswith("[") and "] 45/200" in line
    for text in ("00:12<00:48", "3.21it/s", "loss 1.8173", "next save 50", "last save resumed 40"):
        assert text in line, line


def test_narrow_terminal_drops_the_least_useful_fields_first() -> None:
    at_80 = progress_line(step=45, total=200, width=80, **FULL)
    assert "last save" not in at_80  # the first to go
    assert all(t in at_80 for t in ("loss 1.8173", "00:12<00:48", "3.21it/s", "next save"))
    at_60 = progress_line(step=45, total=200, width=60, **FULL)
    assert "it/s" not in at_60 and "loss 1.8173" in at_60 and "00:12<00:48" in at_60
    assert progress_line(step=45, total=200, width=8, **FULL) == "45/200"


def test_bar_shrinks_and_fills() -> None:
    wide = progress_line(step=200, total=200, width=200, loss=0.5)
    assert wide.startswith("[" + "#" * 30 + "]")
    assert progress_line(step=0, total=200, width=30).startswith("[.....")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "00:00"), (59.9, "00:59"), (75, "01:15"), (3600 * 2 + 61, "2:01:01"), (None, "?")],
)
def test_clock_reads_like_tqdm(seconds: float | None, text: str) -> None:
    assert clock(seconds) == text


def test_rate_reads_like_tqdm() -> None:
    assert rate_text(3.214) == "3.21it/s"
    assert rate_text(0.08) == "12.50s/it"
    assert rate_text(None) == "?it/s"


def test_eta_from_the_rate_and_zero_at_the_end() -> None:
    assert "00:10<00:30" in progress_line(step=10, total=40, width=200, elapsed=10, steps_per_s=1)
    assert "<00:00" in progress_line(step=40, total=40, width=200, elapsed=10, steps_per_s=1)
    assert "00:01<?" in progress_line(step=1, total=40, width=200, elapsed=1)
