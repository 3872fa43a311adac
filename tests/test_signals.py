"""Stop signals, emergency checkpoints, the grace period and crashes in the loop."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, ConfigError
from safepoint.manifest import MANIFEST_NAME
from safepoint.records import read_events
from safepoint.signals import (
    NonFiniteLossError,
    TrainingStopped,
    installed_signals,
    parse_signals,
)
from safepoint.validity import scan
from tests.conftest import run_toy, same_tensors, toy_cmd

sys.path.insert(0, str(Path(__file__).parent))
import toy_train


def wait_for_line(proc: subprocess.Popen[str], prefix: str, deadline: float = 60) -> str:
    """Read the child's stdout until a line starts with ``prefix`` (with a deadline)."""
    end = time.monotonic() + deadline
    assert proc.stdout is not None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line {prefix!r} from the child within {deadline} s")


def wait_until(cond, deadline: float = 30, what: str = "condition") -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.002)
    raise AssertionError(f"{what} not reached within {deadline} s")


def valid_steps(out: Path) -> list[int]:
    return [i.step for i in scan(out) if i.valid]


def manifest_reason(out: Path, step: int) -> str:
    import json

    return json.loads((out / f"checkpoint-{step}" / MANIFEST_NAME).read_bytes())["reason"]


# ------------------------------------------------------------------ real processes

TOY_ARGS = ("--steps", "24", "--save-every", "100", "--step-sleep", "0.05")


@pytest.mark.crash
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name
)
def test_signal_saves_the_exact_step_exits_3_and_resumes_bit_identical(
    tmp_path: Path, sig: signal.Signals, reference_run
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        toy_cmd(out, *TOY_ARGS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    reached = int(wait_for_line(proc, "step 6").split()[1])
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert time.monotonic() - sent < 30  # at the next step boundary, not at the end (24 s)
    assert "rerun the same command to resume" in err
    (step,) = valid_steps(out)  # save_every=100: only the emergency checkpoint exists
    assert reached < step < 24
    assert manifest_reason(out, step) == "emergency"
    assert not installed_signals()
    events = [e for e in read_events(out) if e["event"] in ("signal", "emergency_save")]
    assert [e["event"] for e in events] == ["signal", "emergency_save"]
    assert events[0]["signal"] == sig.name and events[1]["result"] == "committed"

    rerun = run_toy(out, *TOY_ARGS)
    assert f"start {step}" in rerun.stdout
    assert same_tensors(out / "final.safetensors", reference_run(*TOY_ARGS))


@pytest.mark.crash
def test_second_signal_during_the_emergency_save_aborts_it_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A wide model (~200 MB of state) so that the emergency save takes a while.
    args = ("--steps", "1000", "--save-every", "3", "--keep-last", "2", "--step-sleep", "1.0")
    args += ("--width", "800000")
    proc = subprocess.Popen(
        toy_cmd(out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_line(proc, "step 4", deadline=120)  # checkpoint-3 is committed
    proc.send_signal(signal.SIGTERM)  # the stop acts at the end of step 5
    staging = lambda: [p for p in out.iterdir() if p.name.startswith(".staging-checkpoint-5")]  # noqa: E731
    wait_until(lambda: staging() or proc.poll() is not None, 60, "the emergency save")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "aborted the emergency save" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    assert valid_steps(out) == [3]
    results = [e["result"] for e in read_events(out) if e["event"] == "emergency_save"]
    assert results == ["aborted"]


# -------------------------------------------------------------------- in process


def _loop(ckpt: Checkpointer, state: dict, start: int, stop: int, *, fail_at=None) -> None:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    for step in range(start, stop):
        if fail_at == (step + 1, "forward"):
            torch.randn(8, 16)  # the data of the step was drawn: the RNG moved
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = toy_train.train_step(model, opt, sched)
        if fail_at == (step + 1, "after_optimizer"):
            raise ValueError("bad batch")
        ckpt.step(step + 1, state, metrics={"loss": loss})


def _fresh_state() -> dict:
    import random

    import numpy as np

    model, opt, sched = toy_train.build(8)
    random.seed(1)
    np.random.seed(2)
    return {"model": model, "optimizer": opt, "scheduler": sched}


def test_exception_before_the_optimizer_step_saves_the_last_step_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    ref = _fresh_state()
    with Checkpointer(tmp_path / "ref", save_every="100") as ckpt:
        _loop(ckpt, ref, 0, 10)

    state = _fresh_state()
    with pytest.raises(RuntimeError) as info, Checkpointer(tmp_path / "run", save_every="4") as c:
        _loop(c, state, 0, 10, fail_at=(7, "forward"))
    assert valid_steps(tmp_path / "run") == [4, 6]
    assert manifest_reason(tmp_path / "run", 6) == "exception: RuntimeError"
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "checkpoint-6" in notes and "batch size" in notes

    state = _fresh_state()
    with Checkpointer(tmp_path / "run", save_every="100") as ckpt:
        start = ckpt.restore(state)
        assert start == 6
        _loop(ckpt, state, start, 10)
    for a, b in zip(ref["model"].parameters(), state["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_exception_after_the_optimizer_step_saves_nothing(tmp_path: Path) -> None:
    state = _fresh_state()
    with pytest.raises(ValueError) as info, Checkpointer(tmp_path, save_every="4") as ckpt:
        _loop(ckpt, state, 0, 10, fail_at=(7, "after_optimizer"))
    assert valid_steps(tmp_path) == [4]
    assert "not that of a completed step" in "\n".join(info.value.__notes__)
    (event,) = [e for e in read_events(tmp_path) if e["event"] == "exception"]
    assert event["step"] == 6 and event["saved"] is None


def test_nan_loss_guard_names_the_background_save_in_flight(tmp_path: Path) -> None:
    """A non-finite loss right after a background save: the message names that
    checkpoint (the guard waits for it to be written), not the one before it."""
    state = _fresh_state()
    with Checkpointer(tmp_path, save_every="2", stop_on_nan=True, async_save=True) as ckpt:
        ckpt.step(2, state, metrics={"loss": 1.0})
        with pytest.raises(NonFiniteLossError, match=r"step 3.*checkpoint-2"):
            ckpt.step(3, state, metrics={"loss": float("nan")})


def test_nan_loss_guard_stops_without_saving_the_step(tmp_path: Path) -> None:
    state = _fresh_state()
    with Checkpointer(tmp_path, save_every="2", stop_on_nan=True) as ckpt:
        ckpt.step(2, state, metrics={"loss": 1.0})
        with pytest.raises(NonFiniteLossError, match=r"step 3.*checkpoint-2"):
            ckpt.step(3, state, metrics={"loss": math.nan})
    assert valid_steps(tmp_path) == [2]


def test_grace_too_short_for_a_save_skips_it_and_says_so(tmp_path: Path) -> None:
    state = _fresh_state()
    with Checkpointer(tmp_path, save_every="2", grace="0.000001s") as ckpt:
        handle = ckpt.step(2, state)
        assert handle is not None
        handle.wait()  # a measured save (in the background): longer than the grace period
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(TrainingStopped, match=r"without an emergency checkpoint.*grace") as e:
            ckpt.step(3, state)
    assert e.value.code == 3 and e.value.exit_code == 3
    assert valid_steps(tmp_path) == [2]


def test_under_a_grace_period_the_save_in_flight_gives_way(tmp_path: Path) -> None:
    big = {"w": torch.zeros(50_000_000)}  # 200 MB: its background save takes a while
    with Checkpointer(tmp_path, save_every="1000", async_save=True, grace="60s") as ckpt:
        ckpt.save(1, big)  # written in the background
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(TrainingStopped, match="saved the emergency checkpoint"):
            ckpt.step(2, big)
    events = [e["event"] for e in read_events(tmp_path)]
    assert 2 in valid_steps(tmp_path)
    assert "save_abandoned" in events or 1 in valid_steps(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_signal_after_the_last_step_stops_at_close(tmp_path: Path) -> None:
    state = _fresh_state()
    ckpt = Checkpointer(tmp_path, save_every="2", total_steps=2)
    ckpt.step(2, state)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="after the last step"):
        ckpt.close()
    assert not installed_signals()


def test_second_signal_outside_a_save_stops_at_once(tmp_path: Path) -> None:
    state = _fresh_state()
    with Checkpointer(tmp_path, save_every="100") as ckpt:
        ckpt.step(1, state)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(TrainingStopped, match="at once"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here
    assert valid_steps(tmp_path) == []


def test_handlers_are_restored_even_when_closed_out_of_order(tmp_path: Path) -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGUSR1, mine)
    try:
        a = Checkpointer(tmp_path / "a", signals="USR1")
        b = Checkpointer(tmp_path / "b", signals="TERM,USR1")
        assert signal.getsignal(signal.SIGUSR1) is not mine
        a.close()
        assert signal.getsignal(signal.SIGUSR1) is not mine  # b still needs it
        b.close()
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert not installed_signals()
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_no_handlers_outside_the_main_thread(tmp_path: Path) -> None:
    seen: list[set] = []

    def run() -> None:
        with Checkpointer(tmp_path):
            seen.append(installed_signals())

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert seen == [set()]


def test_signals_option_parsing() -> None:
    assert parse_signals("TERM,usr1, SIGINT") == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    assert parse_signals("none") == () and parse_signals(None) == ()
    with pytest.raises(ConfigError, match="unknown signal 'TERMS'"):
        parse_signals("TERMS")
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        parse_signals("KILL")


@pytest.mark.crash
def test_sigterm_during_an_eval_and_save_step_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Issue #12 part 4: a SIGTERM while step 5 trains (5 is an eval and a save step). The
    emergency checkpoint used to be taken at step 5's log, before its evaluation, which
    draws from the torch RNG (the eval DataLoader's iterator takes a seed): the resumed
    run then differed (max abs diff up to 1.0). It is now taken after the evaluation."""
    train = ["--max-steps", "10", "--save-every", "5", "--seed", "0", "--output-dir"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", "safepoint", "train"]
    assert subprocess.run([*cmd, *train, str(ref)], capture_output=True).returncode == 0
    helper = Path(__file__).parent / "programs" / "term_train.py"
    stopped = subprocess.run(
        [sys.executable, str(helper), "5", *train, str(run)], capture_output=True, text=True
    )
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    rerun = subprocess.run([*cmd, *train, str(run)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    said = " ".join((rerun.stdout + rerun.stderr).split())  # lines wrap at 80 columns
    assert f"resuming from {run / 'checkpoint-5'} (step 5)" in said
    name = "adapter_model.safetensors"
    assert same_tensors(ref / "checkpoint-10" / name, run / "checkpoint-10" / name)


# ------------------------------------------- #28 item 9: exit code 3 after any stop

STOP_POINTS = Path(__file__).parent / "programs" / "stop_points.py"


def _stop_points(tmp_path: Path, mode: str, sig: str) -> subprocess.CompletedProcess[str]:
    """``safepoint train`` on the tiny model, signalling itself at the points of ``mode``."""
    return subprocess.run(
        [
            *(sys.executable, str(STOP_POINTS), mode, sig),
            *(
                "--max-steps",
                "4",
                "--eval-split",
                "0",
                "--keep-best",
                "0",
                "--output-dir",
                str(tmp_path / "run"),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.crash
@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_third_signal_after_a_stop_at_once_still_exits_3(tmp_path: Path, sig: str) -> None:
    done = _stop_points(tmp_path, "three", sig)
    assert done.stdout.count(f"sending {sig}") == 3, done.stdout
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("safepoint:")]
    assert lines[-2].startswith(f"safepoint: stopped at once by a second signal ({sig})")
    assert lines[-1] == f"safepoint: received {sig} again: the stop is already under way"
    assert "Traceback" not in done.stderr


@pytest.mark.crash
def test_a_signal_during_the_final_table_of_a_finished_run_exits_3(tmp_path: Path) -> None:
    done = _stop_points(tmp_path, "table", "SIGTERM")
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    assert done.stdout.splitlines()[-1] == "sending SIGTERM"  # after the done: line
    assert any(line.startswith("done: 4 steps") for line in done.stdout.splitlines())
    said = (  # the last line, with its continuation lines at 80 columns (#29 item 4)
        f"safepoint: stopped by SIGTERM outside a training step; the checkpoints in "
        f"{tmp_path / 'run'} are as they were; rerun the same command to resume"
    )
    assert " ".join(done.stderr.split()).endswith(" ".join(said.split()))
    assert valid_steps(tmp_path / "run") == [4]
