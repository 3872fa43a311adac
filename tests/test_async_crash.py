"""async_save under SIGKILL: a kill while the background writer works never costs the run.

The toy run saves ~12 MB every step in the background; it is killed at random instants
while a staging folder exists (the writer is writing), then rerun until it finishes. The
final weights must be bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from safepoint import latest_checkpoint
from safepoint.records import read_events
from safepoint.validity import inspect

from .conftest import run_toy, same_tensors, toy_cmd

pytestmark = pytest.mark.crash

ARGS = (
    "--steps", "30", "--save-every", "1", "--keep-last", "2", "--width", "50000", "--async-save",
)  # fmt: skip


def _busy_dir(out: Path, deadline: float) -> bool:
    """Wait until the writer has a staging folder open; False at the deadline."""
    while time.monotonic() < deadline:
        try:
            if any(n.startswith(".staging-") for n in os.listdir(out)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return False


def _check(out: Path) -> None:
    latest = latest_checkpoint(out)
    assert latest is None or inspect(latest, deep=True).valid
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):  # every committed folder is whole
            assert inspect(out / name, deep=True).valid, name


def _kill_while_writing(out: Path, args: tuple[str, ...], kills: int, seed: int) -> int:
    rng = random.Random(seed)
    done = 0
    while done < kills:
        proc = subprocess.Popen(
            toy_cmd(out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first = proc.stdout.readline()
        assert first.startswith("start "), proc.stderr.read()
        if int(first.split()[1]) >= int(args[1]) - 6:  # leave steps after the last kill
            proc.kill()
            proc.communicate()
            break
        writing = _busy_dir(out, time.monotonic() + 20)
        time.sleep(rng.uniform(0.0, 0.05) if writing else 0)
        proc.kill()
        proc.communicate()
        done += 1
        _check(out)
    return done


@pytest.mark.parametrize("mode", [(), ("--copy-free",)], ids=["staged", "copy-free"])
def test_kill_while_writing_in_background(
    tmp_path: Path, reference_run, mode: tuple[str, ...]
) -> None:
    out = tmp_path / "run"
    args = (*ARGS, *mode)
    assert _kill_while_writing(out, args, kills=4, seed=7) >= 3
    run_toy(out, *args)
    _check(out)
    assert not [n for n in os.listdir(out) if n.startswith((".staging", ".trash"))]
    assert same_tensors(out / "final.safetensors", reference_run(*ARGS))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--copy-free",)], ids=["staged", "copy-free"])
def test_kill_while_writing_many_times(
    tmp_path: Path, reference_run, mode: tuple[str, ...]
) -> None:
    out = tmp_path / "run"
    long_args = ("--steps", "150", *ARGS[2:], *mode)
    assert _kill_while_writing(out, long_args, kills=22, seed=11) >= 20
    run_toy(out, *long_args)
    _check(out)
    assert same_tensors(out / "final.safetensors", reference_run("--steps", "150", *ARGS[2:]))


def test_kill_inside_the_writer_thread_at_a_named_point(tmp_path: Path, reference_run) -> None:
    out = tmp_path / "run"
    died = run_toy(out, *ARGS, env={"SAFEPOINT_CRASH_AT": "after_manifest@3"}, check=False)
    assert died.returncode == -9
    assert latest_checkpoint(out) == out / "checkpoint-2"  # the third save never committed
    rerun = run_toy(out, *ARGS)
    assert "start 2" in rerun.stdout
    assert same_tensors(out / "final.safetensors", reference_run(*ARGS))


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=lambda s: s.name,
)
def test_stop_signal_while_a_save_is_in_flight(
    tmp_path: Path, sig: signal.Signals, reference_run
) -> None:
    """The in-flight save finishes, the emergency save follows it, exit 3, exact resume."""
    out = tmp_path / "run"
    args = ("--steps", "24", "--save-every", "4", "--width", "50000", "--async-save")
    proc = subprocess.Popen(
        toy_cmd(out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert _busy_dir(out, time.monotonic() + 60), "no background save started"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert not [n for n in os.listdir(out) if n.startswith((".staging", ".trash"))]
    _check(out)
    saves = [e for e in read_events(out) if e["event"] == "save"]
    assert saves and all(e.get("result") == "committed" for e in saves)
    rerun = run_toy(out, *args)
    assert same_tensors(out / "final.safetensors", reference_run(*args))
    assert rerun.returncode == 0
