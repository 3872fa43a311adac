"""Warm starts of ``safepoint chaos --file-events``: a run forked from a zygote behaves as
the same command started fresh (argv, ``sys.path``, exit code, signals, threads, atexit,
its own session), and both count the same file events."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safepoint.app.chaos_events import count_events
from safepoint.app.chaos_process import Runner, kill_group, python_target

PROGRAMS = Path(__file__).parent / "programs"
PY = sys.executable

# Reports how it was started, then ends as its first argument says.
PROBE = textwrap.dedent(
    """
    import atexit, os, sys, threading, time
    import helper  # a module beside the script: sys.path[0] is the script's folder
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    print("argv", sys.argv[1:], "main", __name__, "session", os.getsid(0) == os.getpid())
    print("stdin", repr(sys.stdin.read()))
    atexit.register(lambda: print("atexit ran", flush=True))
    def late():
        time.sleep(0.3)
        print("thread joined", flush=True)
    threading.Thread(target=late).start()
    how = sys.argv[2]
    if how == "raise":
        raise RuntimeError("boom")
    if how == "sleep":
        time.sleep(60)
    sys.exit(int(how))
    """
)


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "helper.py").write_text("")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    return script


@pytest.fixture
def warm(tmp_path: Path, probe: Path) -> Iterator[Runner]:
    runner = Runner([PY, str(probe), "{out}"], tmp_path / "work", timeout=60, warm=True)
    yield runner
    runner.close()


def _run(runner: Runner, tmp_path: Path, how: str) -> tuple[int, str]:
    runner.command = [*runner.command[:3], how]
    log = tmp_path / f"{how}.log"
    rc = runner.start(tmp_path / "out", log).wait(60)
    return rc, log.read_text()


def test_python_commands_are_recognized(tmp_path: Path) -> None:
    assert python_target([PY, "train.py", "{out}"]) == (PY, "path", "train.py", "train.py", 2)
    assert python_target([PY, "-m", "safepoint", "train"]) == (
        PY, "module", "safepoint", "safepoint", 3
    )  # fmt: skip
    assert python_target([PY, "-c", "pass", "x"]) == (PY, "code", "pass", "-c", 3)
    console = shutil.which("safepoint")
    assert console is not None
    target = python_target(["safepoint", "train"])
    assert target is not None and target[1:] == ("path", console, "safepoint", 1)
    env_script = tmp_path / "run"
    env_script.write_text("#!/usr/bin/env python3\nprint(1)\n")
    env_script.chmod(0o755)
    assert python_target([str(env_script)]) == (
        shutil.which("python3"), "path", str(env_script), str(env_script), 1
    )  # fmt: skip
    shell = tmp_path / "run.sh"
    shell.write_text("#!/bin/bash\necho 1\n")
    shell.chmod(0o755)
    for command in ([str(shell)], ["bash", "-c", "true"], [PY, "-u", "x.py"], ["no-such-cmd"]):
        assert python_target(command) is None, command


def test_a_warm_run_is_started_as_a_fresh_one(tmp_path: Path, warm: Runner, probe: Path) -> None:
    assert warm.warm
    rc, log = _run(warm, tmp_path, "7")
    assert rc == 7, log
    out = tmp_path / "out"
    assert f"argv ['{out}', '7'] main __main__ session True" in log
    assert "stdin ''" in log  # stdin is /dev/null, not the zygote's requests
    assert log.index("thread joined") < log.index("atexit ran")  # as Py_FinalizeEx does
    cold = Runner([PY, str(probe), "{out}", "7"], tmp_path / "cold", timeout=60)
    cold_log = tmp_path / "cold.log"
    assert cold.start(out, cold_log).wait(60) == 7
    assert cold_log.read_text() == log


def test_a_warm_runs_exception_and_signals_end_it_as_they_would(
    tmp_path: Path, warm: Runner
) -> None:
    rc, log = _run(warm, tmp_path, "raise")
    assert rc == 1 and "RuntimeError: boom" in log, log
    warm.command = [*warm.command[:3], "sleep"]
    proc = warm.start(tmp_path / "out", tmp_path / "sleep.log")
    time.sleep(1)
    kill_group(proc, signal.SIGKILL)  # its own session: the pid is the group
    assert proc.wait(30) == -signal.SIGKILL
    rc, _ = _run(warm, tmp_path, "0")  # the zygote serves the next run
    assert rc == 0
    assert len(list((tmp_path / "work" / "logs").glob("zygote-*.log"))) == 1


def test_warm_runs_in_parallel_take_a_zygote_each(tmp_path: Path, warm: Runner) -> None:
    warm.command = [*warm.command[:3], "sleep"]
    procs = [warm.start(tmp_path / f"out{i}", tmp_path / f"s{i}.log") for i in range(2)]
    assert procs[0].pid != procs[1].pid
    for proc in procs:
        kill_group(proc, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    assert len(list((tmp_path / "work" / "logs").glob("zygote-*.log"))) == 2


@pytest.mark.parametrize("warm_start", [True, False])
def test_runs_side_by_side_share_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm_start: bool
) -> None:
    """``--jobs 2``: each run gets half the cores for torch (a thread per core in each
    oversubscribed the machine, 10x slower); a user's own OMP_NUM_THREADS stays."""
    from safepoint.app.chaos_process import threads_per_job

    script = tmp_path / "threads.py"
    script.write_text(
        "import os, torch\n"
        "print('threads', torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'), flush=True)\n"
    )
    cores = len(os.sched_getaffinity(0))

    def threads(jobs: int, name: str) -> tuple[int, str]:
        runner = Runner([PY, str(script)], tmp_path / name, 60, warm=warm_start, jobs=jobs)
        try:
            log = tmp_path / f"{name}.log"
            assert runner.start(tmp_path / name, log).wait(120) == 0, log.read_text()
            torch_threads, env = log.read_text().split("threads")[1].split()[:2]
            return int(torch_threads), env
        finally:
            runner.close()

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_job(2) == max(1, cores // 2)
    assert threads(2, "two") == (max(1, cores // 2), str(max(1, cores // 2)))
    assert threads(1, "one") == (cores, "None")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert threads(2, "mine")[1] == "7"


def test_a_zygote_that_died_is_a_clear_error(tmp_path: Path, warm: Runner) -> None:
    from safepoint.errors import ConfigError

    assert _run(warm, tmp_path, "0")[0] == 0
    zygote = warm._idle[0]
    os.kill(zygote.proc.pid, signal.SIGKILL)
    zygote.proc.wait()
    with pytest.raises(ConfigError, match=r"warm-start process ended.*--cold"):
        _run(warm, tmp_path, "0")


def test_warm_and_cold_runs_make_the_same_file_events(tmp_path: Path) -> None:
    toy = [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "4", "--save-every", "2"]
    events = {}
    for name in ("cold", "warm"):
        with Runner(toy, tmp_path / f"work-{name}", 120, warm=name == "warm") as runner:
            ref = count_events(runner, tmp_path / name, timeout=120)
        # The run record may hold a warning more or less (it depends on measured save
        # times: a cold process's first save is slower); a point in it is found by its
        # place among the record's own events, as test_every_run_makes_the_same_file_events
        # says. Every other file event must be the same.
        events[name] = [(e.kind, e.path) for e in ref.events if e.path != "safepoint.log.jsonl"]
    assert events["warm"] == events["cold"]
    assert len(events["warm"]) > 20
