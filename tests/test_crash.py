"""Real processes killed with SIGKILL in the middle of saving, then rerun.

After every kill: the newest checkpoint resume would pick is valid, `safepoint verify`
passes on what was committed, the rerun finishes, and the final weights are bit-for-bit
those of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safepoint.validity import inspect, latest_checkpoint, scan
from tests.conftest import run_toy, same_tensors, toy_cmd

pytestmark = pytest.mark.crash

# ~5 MB per checkpoint (model + AdamW state): several write chunks per save.
ARGS = ("--steps", "20", "--save-every", "5", "--keep-last", "2", "--width", "20000")


def assert_recoverable(out: Path) -> None:
    """What must hold after any crash."""
    latest = latest_checkpoint(out)
    if latest is not None:
        assert inspect(latest, deep=True).valid
    committed = [i for i in scan(out, deep=True) if i.status != "staging"]
    assert all(i.valid for i in committed), [(i.name, i.problems) for i in committed]
    verify = subprocess.run(
        [sys.executable, "-m", "safepoint", "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize(
    ("point", "left_behind"),
    [
        ("tensor_file@3", ".staging-checkpoint-15-"),
        ("after_files@3", ".staging-checkpoint-15-"),
        ("after_manifest@3", ".staging-checkpoint-15-"),
        ("after_rename@3", None),
        ("retention@1", ".trash-checkpoint-5-"),
    ],
)
def test_kill_at_each_point_of_the_protocol(tmp_path, reference_run, point, left_behind) -> None:
    out = tmp_path / "run"
    died = run_toy(out, *ARGS, env={"SAFEPOINT_CRASH_AT": point}, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    names = os.listdir(out)
    if left_behind:
        assert any(n.startswith(left_behind) for n in names), names
    assert_recoverable(out)
    expected_latest = {"after_rename@3": 15, "retention@1": 15}.get(point, 10)
    assert latest_checkpoint(out) == out / f"checkpoint-{expected_latest}"

    rerun = run_toy(out, *ARGS)
    assert f"start {expected_latest}" in rerun.stdout
    assert not [n for n in os.listdir(out) if n.startswith((".staging", ".trash"))]
    assert_recoverable(out)
    assert same_tensors(out / "final.safetensors", reference_run(*ARGS))


RANDOM_ARGS = ("--steps", "150", "--save-every", "1", "--keep-last", "2", "--width", "50000")


def test_kill_at_random_instants(tmp_path: Path, reference_run) -> None:
    """22 kills at random instants of a run that saves ~12 MB every step."""
    rng = random.Random(1234)
    out = tmp_path / "run"
    kills = 0
    while kills < 22:
        proc = subprocess.Popen(
            toy_cmd(out, *RANDOM_ARGS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first = proc.stdout.readline()
        assert first.startswith("start "), proc.stderr.read()
        if int(first.split()[1]) >= 140:  # keep steps to run after the last kill
            proc.kill()
            proc.wait()
            break
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.communicate()
        kills += 1
        assert_recoverable(out) if kills % 5 == 0 else _quick_check(out)
    assert kills >= 20
    run_toy(out, *RANDOM_ARGS)
    assert_recoverable(out)
    assert same_tensors(out / "final.safetensors", reference_run(*RANDOM_ARGS))


def _quick_check(out: Path) -> None:
    latest = latest_checkpoint(out)
    assert latest is None or inspect(latest, deep=True).valid
