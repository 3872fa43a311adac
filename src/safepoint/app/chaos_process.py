"""The command under test as a child process, for every mode of ``safepoint chaos``.

``Runner`` starts the user's command with ``{out}`` replaced by an output directory, its
output into a log, in a session of its own so that a kill reaches every process the
command starts; with a ``chaos_hook`` spec, under the file-event hook. The functions
watch it, kill it and read back what it did: its log's last line, whether it said
``resuming from <path> (step N)``, and its run record, split per process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safepoint.errors import ConfigError
from safepoint.records import read_events

HOOK_ENV = "SAFEPOINT_CHAOS_HOOK"
RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")

Process = subprocess.Popen[bytes]


class Runner:
    """Starts the command in output directories; one folder of logs (and of the hook)."""

    def __init__(self, command: Sequence[str], work: Path, timeout: float) -> None:
        self.command = list(command)
        self.work = work
        self.timeout = timeout  # seconds a run may take
        self.hook_dir = work / "hook"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def argv(self, out: Path) -> list[str]:
        return [arg.replace("{out}", str(out)) for arg in self.command]

    def env(self, spec: str | None) -> dict[str, str]:
        """The child's environment: with ``spec``, the hook first on its ``PYTHONPATH``
        as ``sitecustomize`` (installed on first use) and told ``spec``."""
        env = {k: v for k, v in os.environ.items() if k != HOOK_ENV}
        if spec is not None:
            self.install_hook()
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = str(self.hook_dir) + (os.pathsep + path if path else "")
            env[HOOK_ENV] = spec
        return env

    def install_hook(self) -> None:
        """Put the hook in place (once; atomically, for runs started from several threads)."""
        hook = self.hook_dir / "sitecustomize.py"
        if hook.exists():
            return
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        part = hook.with_name(f".sitecustomize.{os.getpid()}.{threading.get_ident()}")
        shutil.copyfile(Path(__file__).with_name("chaos_hook.py"), part)
        os.replace(part, hook)

    def start(self, out: Path, log: Path, spec: str | None = None) -> Process:
        """The command started in ``out``, its stdout and stderr into ``log``."""
        argv = self.argv(out)
        with open(log, "wb") as f:
            try:
                # A session of its own: a kill reaches every process the command starts.
                return subprocess.Popen(
                    argv,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self.env(spec),
                )
            except OSError as e:
                raise ConfigError(
                    f"cannot run {argv[0]!r} ({e.strerror}); check the command"
                ) from None

    def wait(self, proc: Process, seconds: float) -> int | None:
        """Exit code, or None after killing it ``seconds`` from now."""
        return finish(proc, time.monotonic() + seconds)


def kill_group(proc: Process, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of the command (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def kill(proc: Process) -> None:
    """SIGKILL every process of the command and reap it."""
    kill_group(proc, signal.SIGKILL)
    proc.wait()


def finish(proc: Process, deadline: float) -> int | None:
    """Exit code, or None after killing it at ``deadline`` (monotonic)."""
    try:
        return proc.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def watch(
    proc: Process,
    deadline: float,
    stop: Callable[[], bool] | None = None,
    *,
    poll: float = 0.05,
) -> int | None:
    """Exit code once ``proc`` ends; None, leaving it running, once ``stop()`` says so
    (asked every ``poll`` seconds) or at ``deadline`` (monotonic)."""
    while True:
        try:
            return proc.wait(poll)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline or (stop is not None and stop()):
                return None


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def exit_text(rc: int | None) -> str:
    """``timeout``, a signal's name (``KILL``) or the exit code."""
    if rc is None:
        return "timeout"
    if rc < 0:
        return f"{signal.Signals(-rc).name.removeprefix('SIG')}"
    return str(rc)


# -------------------------------------------------------------------- run record


def processes(out: Path) -> list[list[dict[str, Any]]]:
    """The run record of ``out`` split into one list of events per process."""
    runs: list[list[dict[str, Any]]] = []
    for event in read_events(out) if out.is_dir() else ():
        if event["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def last_process(out: Path) -> list[dict[str, Any]]:
    runs = processes(out)
    return runs[-1] if runs else []


def progress(events: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(step resumed from, last step reached) of one process's events."""
    resumed = next((e["step"] for e in events if e["event"] == "resume"), None)
    steps = [
        e["step"]
        for e in events
        if e["event"] in ("metrics", "save", "resume") and isinstance(e.get("step"), int)
    ]
    return resumed, max(steps) if steps else None


def resumed_from(log_text: str, out: Path) -> str:
    """The checkpoint (folder name) the last run in ``out`` resumed from, or ``start``:
    what it printed (``resuming from <path> (step N)``), else its run record's resume."""
    found = RESUMING.search(log_text)
    if found:
        return Path(found.group(1)).name
    resume = next((e for e in last_process(out) if e["event"] == "resume"), None)
    checkpoint = resume.get("checkpoint") if resume else None
    return Path(checkpoint).name if isinstance(checkpoint, str) else "start"
