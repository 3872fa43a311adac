"""#28 item 8: ``safepoint verify`` beside a live run whose retention deletes checkpoints.

A checkpoint that was listed and is gone under its name by the time it is read is
"deleted while verifying", no failure; a file missing from a checkpoint still there is.
The fast tests stop ``verify`` between listing and hashing (``SAFEPOINT_PAUSE_AT``, a
named pipe: the test's open returns exactly when verify is there) and let a real run's
retention delete the listed checkpoints at that point.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

from safepoint.cli import main
from tests.conftest import run_toy, toy_cmd


def _verify(out: Path, fifo: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SAFEPOINT_PAUSE_AT": f"verify_listed:{fifo}"}
    return subprocess.Popen(
        [sys.executable, "-m", "safepoint", "verify", *extra, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _reached(proc: subprocess.Popen[str], fifo: Path, deadline: float = 60) -> int:
    """The write end of ``fifo``, opened once ``proc`` waits on it at its pause point."""
    end = time.monotonic() + deadline
    while True:
        try:  # ENXIO until the reader (verify, at its pause point) has opened it
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "verify never reached its pause point"
        time.sleep(0.01)


def _paused_run(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen[str], int]:
    out, fifo = tmp_path / "run", tmp_path / "pause"
    run_toy(out, "--steps", "10", "--save-every", "5")  # checkpoint-5, checkpoint-10
    os.mkfifo(fifo)
    proc = _verify(out, fifo)
    return out, fifo, proc, _reached(proc, fifo)


def test_checkpoints_deleted_by_retention_while_verifying_are_not_failures(
    tmp_path: Path,
) -> None:
    out, _, proc, fd = _paused_run(tmp_path)
    # verify has listed checkpoint-5 and -10: the run goes on to step 15 keeping 1,
    # and its retention deletes both.
    run_toy(out, "--steps", "15", "--save-every", "5", "--keep-last", "1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15"]
    os.close(fd)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    lines = stdout.splitlines()
    assert lines == [
        f"{out / name}: deleted while verifying (a run's retention removed it); not a failure"
        for name in ("checkpoint-5", "checkpoint-10")
    ], stdout


def test_a_file_missing_from_a_checkpoint_that_is_still_there_is_a_failure(
    tmp_path: Path,
) -> None:
    out, _, proc, fd = _paused_run(tmp_path)
    (out / "checkpoint-5" / "state.json").unlink()
    os.close(fd)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stdout + stderr
    assert f"{out / 'checkpoint-5'}: state.json: missing" in stdout.splitlines()
    assert f"{out / 'checkpoint-10'}: ok" in stdout


def test_verify_json_marks_a_deleted_checkpoint(tmp_path: Path) -> None:
    out, fifo = tmp_path / "run", tmp_path / "pause"
    run_toy(out, "--steps", "10", "--save-every", "5")
    os.mkfifo(fifo)
    proc = _verify(out, fifo, "--json")
    fd = _reached(proc, fifo)
    run_toy(out, "--steps", "15", "--save-every", "5", "--keep-last", "2")  # deletes 5
    os.close(fd)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    entries = {e["name"]: e["status"] for e in json.loads(stdout)}
    assert entries == {"checkpoint-5": "deleted", "checkpoint-10": "valid"}


@pytest.mark.slow
def test_verify_in_a_loop_beside_a_run_saving_every_step_never_fails(tmp_path: Path) -> None:
    """The issue's hunt: save every step, keep 1, and verify over and over meanwhile
    (3 failures in 46 runs before). ~5 MB checkpoints, so hashing overlaps deletions."""
    out = tmp_path / "run"
    run = subprocess.Popen(
        toy_cmd(out, "--steps", "400", "--save-every", "1", "--keep-last", "1", "--width", "20000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    assert run.stdout.readline().startswith("start")  # the run has begun saving
    verifies, deleted = 0, 0
    try:
        while run.poll() is None:
            buffer = StringIO()
            with redirect_stdout(buffer):
                code = main(["verify", str(out)])
            assert code == 0, buffer.getvalue()
            verifies += 1
            deleted += buffer.getvalue().count("deleted while verifying")
    finally:
        run.kill()
        run.wait()
    assert verifies >= 50, verifies
    print(f"{verifies} verifies, {deleted} checkpoints deleted while verifying, 0 failures")
