"""``safepoint ls`` in a terminal: fits its width without cutting a cell; says
``complete`` (sizes checked), never ``valid`` (that is what ``verify`` proves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len

from safepoint import Checkpointer

HEADERS = ("checkpoint", "step", "saved", "size", "stall", "write", "state", "kept", "note")
METRICS = ("eval_loss", "grad_norm", "learning_rate", "loss")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-loop run with the metrics a Trainer logs, a corrupt and an incomplete folder."""
    out = tmp_path_factory.mktemp("run") / "a-rather-long-output-directory-name"
    state = {"model": torch.nn.Linear(8, 8)}
    with Checkpointer(out, save_every="10", keep_last=3, keep_best=1, metric="eval_loss") as ck:
        for step in range(1, 101):
            metrics = {"loss": 2.5 - step / 100, "grad_norm": 1.2345678, "learning_rate": 2e-4}
            ck.step(step, state, metrics={**metrics, "eval_loss": 3.0 - step / 1000})
    (out / "checkpoint-90" / "state.json").unlink()
    (out / "checkpoint-110").mkdir()
    return out


def _ls(run_dir: Path, *args: str, columns: int | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", "ls", str(run_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return proc.stdout


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by checkpoint name: the cells of each row."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│").split("│")]
        if len(cells) > 1 and cells[0].startswith("checkpoint-"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("columns", [80, 120])
def test_ls_fits_the_terminal_without_cutting(run_dir: Path, columns: int) -> None:
    out = _ls(run_dir, columns=columns)
    assert "…" not in out
    assert all(cell_len(line) <= columns for line in out.splitlines())
    rows = _rows(out)
    assert set(rows) == {"checkpoint-80", "checkpoint-90", "checkpoint-100", "checkpoint-110"}
    for name, cells in rows.items():
        assert cells[1] == name.split("-")[1]  # the step, whole
    assert "complete" in out and "valid" not in out
    # the note column gave way: the problems are printed below the table
    if "note" not in out.splitlines()[2]:
        assert "checkpoint-90: state.json: missing" in out
        assert "checkpoint-110: no safepoint.json" in out


def test_ls_at_120_keeps_more_than_at_80(run_dir: Path) -> None:
    narrow = _ls(run_dir, columns=80).splitlines()[2]
    wide = _ls(run_dir, columns=120).splitlines()[2]
    assert len(wide.split("┃")) > len(narrow.split("┃")) >= 5
    for header in ("checkpoint", "step", "state"):
        assert header in narrow


def test_ls_wide_and_piped_show_every_column(run_dir: Path) -> None:
    for out in (_ls(run_dir, "--wide", columns=80), _ls(run_dir, columns=None)):
        header = out.splitlines()[2]
        assert all(h in header for h in (*HEADERS, *METRICS))
        assert "…" not in out
        assert "state.json: missing" in _rows(out)["checkpoint-90"][-1]
        assert any(len(c) == 19 and c[4] == "-" for c in _rows(out)["checkpoint-100"])  # full time


def test_ls_json_says_complete_and_verify_says_valid(run_dir: Path) -> None:
    rows = json.loads(_ls(run_dir, "--json", columns=80))
    status = {r["name"]: r["status"] for r in rows}
    assert status["checkpoint-100"] == "complete"
    assert status["checkpoint-90"] == "corrupt" and status["checkpoint-110"] == "incomplete"
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", "verify", "--json", str(run_dir / "checkpoint-100")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout)[0]["status"] == "valid"
