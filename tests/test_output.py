"""What a user sees: one line for a planned stop, the resume named the same way in every
case (also from ``SafepointCallback`` in a user's own script), a quiet ``export``.

All real processes: ``safepoint train`` on the built-in tiny model, the user script
``tests/programs/hf_user_train.py``, ``safepoint export``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USER_SCRIPT = Path(__file__).parent / "programs" / "hf_user_train.py"
SHORT = ("--max-steps", "6", "--save-every", "3", "--batch-size", "4")


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:  # the tiny model is built once per session
        mp.setenv("SAFEPOINT_HOME", str(tmp_path_factory.getbasetemp() / "safepoint-home"))
        yield


def safepoint_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "safepoint", *args]


def run(argv: list[str], *, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def train(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(safepoint_cmd("train", "--output-dir", str(out), *args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "run"
    train(out, *SHORT)
    return out


# ------------------------------------------------------------------------ stop


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_prints_one_line_and_no_error(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    argv = safepoint_cmd("train", "--output-dir", str(out), "--max-steps", "500")
    proc = subprocess.Popen(
        [*argv, "--save-every", "2", "--batch-size", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    lines = (stdout + stderr).splitlines()
    stops = [line for line in lines if "stopped by" in line]
    assert len(stops) == 1, lines
    # one line, in either of its two forms: an emergency checkpoint was saved, or the
    # stop fell on a step whose scheduled save (after its evaluation) already holds it
    assert f"stopped by {sig.name} at step" in stops[0], stops
    assert "emergency checkpoint" in stops[0] or " holds; rerun" in stops[0], stops
    assert not [line for line in lines if "Error" in line], lines


def test_a_stopped_and_resumed_run_fits_80_columns(tmp_path: Path) -> None:
    """#29 item 4: every line of a run stopped by SIGINT and of its rerun (progress,
    saves with their metrics, the stop lines, the resume, the final table) is at most
    80 characters at COLUMNS=80, and nothing was cut: the save lines keep every metric."""
    env = {**os.environ, "COLUMNS": "80"}
    argv = [*safepoint_cmd("train", "--output-dir", "run"), *SHORT[2:], "--max-steps", "12"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint-3").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    said = stdout + stderr + rerun.stdout + rerun.stderr
    wide = [line for line in said.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    assert "received SIGINT" in stderr and "stopped by SIGINT" in stderr
    assert "resuming from run/checkpoint-" in rerun.stdout and "latest: run/checkpoint-12" in said
    saves = [line for line in said.splitlines() if line.startswith(("saved ", "saving "))]
    for line in saves:  # each save's metrics, whole, on its line or the next
        after = said.splitlines()[said.splitlines().index(line) + 1]
        assert re.search(r"loss \d+\.\d{4}$", line) or re.fullmatch(r"  \S.*\d{4}", after)


# ---------------------------------------------------------------------- resume


def test_a_rerun_names_the_checkpoint_it_resumes_from(finished: Path, tmp_path: Path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint-6")  # as if killed between step 3 and step 6
    proc = train(out, *SHORT)
    said = " ".join(proc.stdout.split())  # lines wrap at 80 columns (a long tmp path)
    assert f"resuming from {out / 'checkpoint-3'} (step 3)" in said


def test_a_rerun_of_a_finished_run_names_it_the_same_way(finished: Path, tmp_path: Path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    proc = train(out, *SHORT)
    said = " ".join((proc.stdout + proc.stderr).split())  # lines wrap at 80 columns
    assert f"resuming from {out / 'checkpoint-6'} (step 6)" in said
    assert "already ends this run" in said and "Error" not in said


def test_the_callback_shows_its_resume_in_a_users_script(tmp_path: Path) -> None:
    from safepoint.app.tiny import tiny_model_path

    out, model = tmp_path / "run", str(tiny_model_path())
    user = [sys.executable, str(USER_SCRIPT), str(out), model, "--save-every", "2"]
    first = run([*user, "--steps", "4"])
    assert "resuming from" not in first.stderr
    again = run([*user, "--steps", "4"])  # already complete
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in again.stderr
    longer = run([*user, "--steps", "6"])
    assert f"safepoint: resuming from {out / 'checkpoint-4'} (step 4)" in longer.stderr


# ---------------------------------------------------------------------- export


def test_export_prints_only_its_own_line(finished: Path, tmp_path: Path) -> None:
    export = safepoint_cmd("export", str(finished), "--checkpoint")
    merged = run([*export, "latest", "--out", str(tmp_path / "m"), "--merge"])
    assert merged.stderr == ""
    lines = merged.stdout.splitlines()
    assert lines[0] == f"exported {finished / 'checkpoint-6'} (merged model) to {tmp_path / 'm'}"
    # and where the base model came from: safepoint's own line, nothing of the libraries'
    assert len(lines) == 2 and lines[1].startswith("base model: ")
    adapter = run([*export, "6", "--out", str(tmp_path / "a")])
    assert adapter.stderr == ""
    assert "(adapter)" in adapter.stdout and (tmp_path / "a/adapter_model.safetensors").is_file()


def test_ctrl_c_under_a_users_tqdm_bar_starts_its_own_line(tmp_path: Path) -> None:
    """#29 item 5: a Ctrl-C under a user's Trainer with tqdm's bar on. The bar's line ends
    in ``\\r... 3/10 [...]`` with no newline; safepoint's stop lines were glued to it
    (``...it/s]received SIGINT``). Each must follow a ``\\n``: a line of its own."""
    from safepoint.app.tiny import tiny_model_path

    script = Path(__file__).parent / "programs" / "tqdm_sigint_train.py"
    argv = [sys.executable, str(script), str(tmp_path / "run"), str(tiny_model_path())]
    # bytes: text mode would turn the bar's \r into \n and hide the glued line
    proc = subprocess.run([*argv, "--steps", "10", "--sigint-at", "3"], capture_output=True)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert re.search(r"\r\s*\d+%\|", err), err  # tqdm's bar was drawn
    for said in ("received SIGINT", "stopped by SIGINT at step"):
        at = err.index(said)
        start = max(err.rfind("\n", 0, at), err.rfind("\r", 0, at)) + 1
        assert err[start - 1] == "\n", repr(err[start - 200 : at + 40])
        assert err[start:at] in ("", "safepoint: "), repr(err[start - 200 : at + 40])


def test_a_fresh_home_says_it_builds_the_tiny_model_first(tmp_path: Path) -> None:
    """#29 item 5: the first run with an empty SAFEPOINT_HOME builds the built-in model
    (up to a minute) and said nothing meanwhile. It says so before anything else of the
    run; the test stops it there (the build itself is not the subject)."""
    env = {**os.environ, "SAFEPOINT_HOME": str(tmp_path / "home")}
    argv = safepoint_cmd("train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        said = []
        for line in proc.stdout:  # type: ignore[union-attr]
            said.append(line)
            if "building the built-in tiny model" in line:
                break
        else:
            raise AssertionError("never said it builds the tiny model:\n" + "".join(said))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert said[-1].startswith("safepoint: building the built-in tiny model in ")
    assert str(tmp_path / "home") in said[-1] and "(once; up to a minute)" in said[-1]
    assert not [line for line in said[:-1] if "step" in line or "loss" in line], said
