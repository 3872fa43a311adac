"""Metrics are those measured at the checkpoint's own step (issue #12): an emergency
checkpoint between evaluations carries no stale eval metric and is never "best", and the
loss of the step it captures is in the run record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safepoint.records import read_events


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "safepoint-home"


def _cmd(out: Path, command: str, *args: str) -> list[str]:
    where = ["--output-dir", str(out)] if command == "train" else [str(out)]
    return [sys.executable, "-m", "safepoint", command, *where, *args]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "SAFEPOINT_HOME": str(home)}


def _losses(out: Path) -> set[int]:
    return {
        e["step"] for e in read_events(out) if e["event"] == "metrics" and "loss" in e["metrics"]
    }


@pytest.mark.slow
def test_emergency_checkpoint_has_no_stale_metric_and_is_not_best(
    home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ("train", "--max-steps", "30", "--save-every", "10", "--eval-every", "10")
    proc = subprocess.Popen(
        _cmd(out, *args),
        env=_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    # Ctrl-C once step 12 is logged: after the eval of step 10, before the one of step 20.
    while not any(s >= 12 for s in _losses(out)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    # an emergency save has no eval metric by design: no misconfiguration warning for it
    assert "has no such metric" not in err, err[-2000:]
    stop = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert stop % 10, f"the stop landed on an eval step ({stop}); rerun the test"
    manifest = json.loads((out / f"checkpoint-{stop}" / "safepoint.json").read_text())
    assert manifest["reason"] == "emergency"
    assert "eval_loss" not in manifest["metrics"], manifest["metrics"]  # not carried from 10
    assert "loss" in manifest["metrics"]  # the loss of the step it captures
    listing = subprocess.run(
        _cmd(out, "ls", "--json"), env=_env(home), capture_output=True, text=True, check=True
    )
    kept = {c["step"]: c["kept_because"] or "" for c in json.loads(listing.stdout)}
    assert "best" not in kept[stop] and "best" in kept[10], kept
    assert _losses(out) == set(range(1, stop + 1))  # no gap at the stop step

    # The rerun resumes from the emergency checkpoint; every step has its loss.
    done = subprocess.run(
        _cmd(out, *args), env=_env(home), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(out) == set(range(1, 31))
